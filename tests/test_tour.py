"""The README's five-minute tour, run as it stands: so the README cannot rot again.

The block between `<!-- tour:start -->` and `<!-- tour:end -->` runs in bash (`set -euo
pipefail`: any failing command fails the test) in a scratch directory, with `MODEL` set to the
tiny test model instead of SmolLM2 (the tour's first line honours a preset MODEL). The services
listen on their default ports, as the tour says, so nothing else may hold them.

    ./dev run pytest tests/test_tour.py -q
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTS = (50051, 50052, 9091, 9092)


def tour_script() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- tour:start -->\n```bash\n(.*?)```\n<!-- tour:end -->", readme, re.S)
    assert block, "README.md lost its tour markers"
    return block.group(1)


def test_the_readme_tour_runs_as_written(tmp_path, tiny_model_dir):
    for port in DEFAULT_PORTS:  # a clear failure instead of a tour talking to someone else
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken"
    (tmp_path / "tunewire").symlink_to(ROOT / "tunewire")  # the tour's data paths, from the root
    env = {**os.environ, "MODEL": str(tiny_model_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", tour_script()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1100)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    # what each step is there to show
    assert '"ok": true' in out                                   # the pre-flight report
    assert "state succeeded" in out                              # the job, watched to the end
    assert '"adapter": "extract"' in out and '"structured_output_valid": true' in out
    assert re.search(r'tunewire_serving_requests_total\{adapter="extract",frontend="grpc",outcome="ok"\} 1\.0', out)
    assert re.search(r'tunewire_trainer_jobs\{state="SUCCEEDED"\} 1\.0', out)
    assert (tmp_path / "var" / "adapters" / "extract" / "v1" / "manifest.json").is_file()
