"""What the deployment tests share: render a kustomization with `kubectl kustomize` (offline),
validate it strictly against the Kubernetes OpenAPI schemas, pick objects out of it, and read
a service's effective config (its ConfigMap's TOML + the `tunewire serve` flags in its args).

    from manifests import render, one, effective_config

The Secret files a secured config names do not exist here, and the config classes check that
every file they name exists, so `effective_config` builds the config with the
/var/run/secrets/tunewire prefix mapped to a temporary directory holding empty stand-ins, and
returns the values unmapped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from serving_service.config import ServingConfig
from trainer_service.config import TrainerConfig
from tunewire.cli import build_parser
from tunewire.cli.serve import overrides as serve_overrides
from tunewire.config import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["cpu", "gpu"]
DASHBOARDS = sorted((K8S / "base" / "dashboards").glob("*.json"))
# Validated against the oldest release with GA native gRPC probes and the kubectl of the CI image.
K8S_VERSIONS = ["1.27.0", "1.32.0"]
GPU = "nvidia.com/gpu"
CLIENT_LABEL = {"tunewire.dev/client": "true"}
SECRETS = "/var/run/secrets/tunewire/"  # where components/security mounts its Secrets
# TLS / token settings and the Secret key each must name (trainer: also the handoff's client side)
SECRET_FILES = {"auth_token_file": ("tunewire-token", "token"), "tls_cert_file": ("tunewire-tls", "tls.crt"),
                "tls_key_file": ("tunewire-tls", "tls.key"), "tls_client_ca_file": ("tunewire-tls", "ca.crt")}
SERVING_CLIENT_FILES = {"serving_token_file": ("tunewire-token", "token"),
                        "serving_tls_ca_file": ("tunewire-tls", "ca.crt"),
                        "serving_tls_cert_file": ("tunewire-tls", "tls.crt"),
                        "serving_tls_key_file": ("tunewire-tls", "tls.key")}


# -- rendering -------------------------------------------------------------------------------
_rendered: dict[str, list[dict]] = {}


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        _rendered[overlay] = kustomize(K8S / "overlays" / overlay)
    return _rendered[overlay]


def scratch_overlay(tmp_path: Path, name: str, text: str) -> Path:
    """A kustomization at tmp/k8s/overlays/<name> beside links to the real base/, namespace/,
    components/ and overlays/ (kustomize refuses files outside a kustomization's root, but
    follows these links), so `../../components/x` and `../cpu` mean the repo's."""
    (tmp_path / "k8s").mkdir(exist_ok=True)
    for d in ("base", "namespace", "components"):
        if not (tmp_path / "k8s" / d).exists():
            (tmp_path / "k8s" / d).symlink_to(K8S / d)
    overlay = tmp_path / "k8s" / "overlays" / name
    overlay.mkdir(parents=True)
    for real in (K8S / "overlays").iterdir():
        if not (overlay.parent / real.name).exists():
            (overlay.parent / real.name).symlink_to(real)
    (overlay / "kustomization.yaml").write_text(text)
    return overlay


def validate_strictly(docs, where: str):
    """Kubernetes' OpenAPI schemas, strict: a misspelt or misplaced field is an error."""
    import kubernetes_validate as kv  # in requirements/cpu.lock: this test must run
    for d in docs:
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            continue  # test_servicemonitors_are_well_formed
        for version in K8S_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where}: {d['kind']}/{d['metadata']['name']} (k8s {version}): "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(docs):
    """(doc, pod template spec, template labels) of every Deployment and Job."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            tpl = d["spec"]["template"]
            yield d, tpl["spec"], tpl["metadata"].get("labels", {})


def containers(pod):
    return [*pod.get("initContainers", []), *pod["containers"]]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_config(docs, service: str):
    """(TOML values, config class, ConfigMap, TOML text) of a service's rendered ConfigMap."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"].startswith(f"{service}-config"))
    text = cm["data"][f"{service}.toml"]
    cls = TrainerConfig if service == "trainer" else ServingConfig
    return tomllib.loads(text), cls, cm, text


def effective_config(docs, service: str, tmp_path: Path):
    """(config object, effective values) of what the service's container runs: its ConfigMap's
    TOML with the args' `tunewire serve` flags on top, exactly as `tunewire serve` combines them.
    Paths under SECRETS are mapped to empty stand-ins under tmp_path to build the object (the
    config classes want set files to exist); the values returned are the unmapped ones."""
    values, cls, _, text = service_config(docs, service)
    _, c = main_container(one(docs, "Deployment", service))
    ns = build_parser().parse_args(["serve", *c["args"]])
    assert (ns.service, ns.config) == (service, f"/etc/tunewire/{service}.toml")
    overrides = {k: v for k, v in serve_overrides(ns).items() if v is not None}
    mapped = {}
    for k, v in overrides.items():
        if isinstance(v, str) and v.startswith(SECRETS):
            stand_in = tmp_path / "secrets" / v.removeprefix(SECRETS)
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("stand-in\n")
            v = str(stand_in)
        mapped[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{service}.toml"
    path.write_text(text)
    cfg = load_config(cls, str(path), mapped)  # unknown keys and bad values raise
    return cfg, values | overrides


def tls_on(values: dict) -> bool:
    return bool(values.get("tls_cert_file"))


def mount_of(pod, container, claim: str) -> dict:
    vol = next(v["name"] for v in pod["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    return next(m for m in container["volumeMounts"] if m["name"] == vol)


def main_container(doc):
    spec = doc["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == doc["metadata"]["name"])


CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def exported_metrics() -> set[str]:
    """Every sample name the services export, from the prometheus_client definitions."""
    names: set[str] = set()
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")
    for pkg in ("serving_service", "trainer_service", "tunewire"):
        for path in (ROOT / pkg).rglob("*.py"):
            for kind, name in pattern.findall(path.read_text()):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    names |= {f"{base}_total", f"{base}_created"}
                elif kind == "Gauge":
                    names.add(name)
                elif kind == "Histogram":  # no sample carries the bare name
                    names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
                else:  # Summary: quantiles under the bare name
                    names |= {name} | {name + s for s in ("_sum", "_count", "_created")}
    return names
