"""Did a change make CPU training slower? Our LoRA recipe in this tree vs in another revision,
interleaved in rounds, as a ratio (median of the per-round ratios, with the range).

    ./dev run python bench/trainer_trees.py --base 2c29ede [--rounds 4] [--steps 20] [--packed]

The other revision is checked out with `git worktree` into a temp dir (its generated protobuf
code is copied from this tree's: the recipe path does not use the protos that changed). Each round
runs `bench/trainer.py --side ours` (or ours-packed) once in each tree, alternating which goes
first, each in its own process, on the same model, data and settings; the per-round ratio is
this tree's real tokens/s over the base's. Writes docs/bench/trainer_trees.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import conditions, write_json  # noqa: E402 - bench/ is on sys.path as a script
from trainer import run_side  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--packed-batch-size", type=int, default=2, help="rows per step with --packed")
    p.add_argument("--packed", action="store_true", help="compare ours-packed instead of ours")
    p.add_argument("--model", default="")
    p.add_argument("--data", default=str(ROOT / "tunewire" / "data" / "extract_train.jsonl"))
    a = p.parse_args()
    if not a.model:
        from tunewire.models import ensure_default_base_model

        a.model = str(ensure_default_base_model())
    side = "ours-packed" if a.packed else "ours"
    cond = conditions()
    base = Path(tempfile.mkdtemp(prefix="tunewire-base-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), a.base], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        for gen in ROOT.glob("tunewire/*/v1/*_pb2*.py*"):
            (base / gen.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(gen, base / gen.relative_to(ROOT))
        ratios, rows = [], []
        for i in range(a.rounds):
            order = [("base", base), ("this", ROOT)][::1 if i % 2 == 0 else -1]
            tps = {name: run_side(tree, side, a)["tokens_per_s"] for name, tree in order}
            ratios.append(tps["this"] / tps["base"])
            rows.append(tps)
            print(f"[{i + 1}/{a.rounds}] base {tps['base']:7.1f}  this {tps['this']:7.1f} real tok/s"
                  f"  ratio {ratios[-1]:.3f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    result = {"base": a.base, "side": side, "median_ratio": statistics.median(ratios),
              "min_ratio": min(ratios), "max_ratio": max(ratios), "rounds": rows,
              "settings": {k: v for k, v in vars(a).items() if k != "model"}, "conditions": cond}
    print(f"this / {a.base}: {result['median_ratio']:.3f}x (range {result['min_ratio']:.3f}-"
          f"{result['max_ratio']:.3f}) over {a.rounds} rounds, {side}")
    write_json("trainer_trees", result)


if __name__ == "__main__":
    main()
