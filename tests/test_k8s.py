"""Fast checks of the Kubernetes overlays (k8s/overlays/cpu, k8s/overlays/gpu), rendered with
`kubectl kustomize` (offline, tests/manifests.py) and validated against the Kubernetes OpenAPI
schemas with kubernetes-validate in strict mode (unknown fields are errors); the ServiceMonitor
CRD, which those schemas lack, is checked structurally. On top: the restricted pod security
settings on every container, native gRPC probes on the configured ports, the TOML in the
ConfigMaps loading as the services' configs, storage, scaling, NetworkPolicies and the GPU
overlay's GPU requests. The components: tests/test_k8s_components.py; serving's HTTP API (port,
Services, readiness, policy): tests/test_k8s_http.py; the dashboards: tests/test_dashboards.py;
the images: tests/test_docker.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from manifests import (CLIENT_LABEL, CRD_KINDS, GPU, K8S, OVERLAYS, ROOT, containers,
                      effective_config, exported_metrics, kustomize, main_container, mount_of, one,
                      render, scratch_overlay, selects, service_config, tls_on, validate_strictly,
                      workloads)
from tunewire.config import load_config
from tunewire.models import MODEL_NAME


# -- schema validation -----------------------------------------------------------------------
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
    docs = kustomize(scratch_overlay(tmp_path, "cpu-monitoring", text))  # kubectl kustomize, checked
    sms = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sorted(d["metadata"]["name"] for d in sms) == ["serving", "trainer"]
    assert all(d["metadata"]["namespace"] == "tunewire" for d in sms)


# -- pod security ----------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_restricted(overlay):
    docs = render(overlay)
    # with the Kubernetes launcher (overlays/gpu) the trainer, and only it, calls the API: it
    # mounts its ServiceAccount token (tests/test_k8s_components.py checks its RBAC)
    api_caller = "trainer" if service_config(docs, "trainer")[0]["launcher"] == "kubernetes" else None
    seen = 0
    for doc, pod, _ in workloads(docs):
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        api = doc["kind"] == "Deployment" and doc["metadata"]["name"] == api_caller
        assert pod.get("automountServiceAccountToken") is api, where
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
    health_port (health only), else the gRPC port. Serving's readiness without TLS is GET
    /health on the HTTP port (tests/test_k8s_http.py checks it)."""
    docs = render(overlay)
    for name in ("trainer", "serving"):
        doc = one(docs, "Deployment", name)
        _, c = main_container(doc)
        _, values = effective_config(docs, name, tmp_path / name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        expected = {"grpc": values["port"], "metrics": values["metrics_port"]}
        if values.get("health_port"):
            expected["health"] = values["health_port"]
        if values.get("http_port"):
            expected["http"] = values["http_port"]
        if values.get("worker_port") and tls_on(values):  # job pods' plaintext report port
            expected["worker-report"] = values["worker_port"]
        assert ports == expected
        probe_port = values["port"]
        if tls_on(values):
            assert values.get("health_port"), f"{name}: TLS on and no plaintext health_port to probe"
            probe_port = values["health_port"]
        assert (overlay == "gpu") == tls_on(values)  # production secured, kind not
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            if (name, kind) == ("serving", "readinessProbe") and not tls_on(values):
                assert set(probe) & {"grpc", "tcpSocket", "exec"} == set() and "httpGet" in probe
                continue
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
        assert Path(data) in Path(cfg.data_root).parents
        if cfg.launcher == "kubernetes":  # job pods mount trainer-data at data_dir: the mount's root
            assert Path(data) == Path(cfg.data_dir)
        else:
            assert Path(data) in Path(cfg.data_dir).parents
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
    # job pods on other nodes (the Kubernetes launcher: overlays/gpu) mount the job directories too
    launcher = service_config(docs, "trainer")[0]["launcher"]
    data_mode = "ReadWriteMany" if launcher == "kubernetes" else "ReadWriteOnce"
    assert one(docs, "PersistentVolumeClaim", "trainer-data")["spec"]["accessModes"] == [data_mode]
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


def test_exported_metrics_are_collected():
    names = exported_metrics()
    assert {"tunewire_serving_admission_queue_depth", "tunewire_serving_ttft_seconds_bucket",
            "tunewire_serving_requests_total", "tunewire_trainer_loss", "grpc_server_handled_total",
            "tunewire_trainer_peak_gpu_memory_bytes", "tunewire_trainer_mfu"} <= names


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


def test_gpu_overlay_trains_on_gpu_pods(tmp_path):
    """overlays/gpu: the trainer launches each job as Kubernetes pods that request GPUs and
    train on them; the pods it would create validate strictly. Serving runs bf16 on its GPU."""
    from trainer_service.k8s_launcher import manifests, pod_specs
    from trainer_service.server import k8s_settings
    from trainer_service.spec import Hyperparameters, JobSpec

    docs = render("gpu")
    cfg, values = effective_config(docs, "trainer", tmp_path)
    assert cfg.launcher == "kubernetes" and cfg.k8s_gpus_per_pod >= 1 and cfg.device in ("auto", "cuda")
    _, c = main_container(one(docs, "Deployment", "trainer"))
    assert cfg.k8s_image == c["image"] and cfg.k8s_image.split(":")[0].endswith("tunewire-gpu")
    # job pods report on the plaintext worker port, through the trainer's Service
    host, port = cfg.worker_report_address.split(":")
    svc = one(docs, "Service", host)
    assert int(port) == cfg.worker_port == next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "worker-report")
    s = k8s_settings(cfg)
    for nproc, nodes in ((1, 1), (2, 1), (2, 2)):
        job_dir = tmp_path / f"j{nproc}{nodes}"
        job_dir.mkdir()
        (job_dir / "spec.json").write_text(JobSpec(
            base_model="/models/m", training_data="/data/datasets/d.jsonl", adapter_name="a",
            hyperparameters=Hyperparameters(num_processes=nproc, num_nodes=nodes, batch_size=4)).to_json())
        secret, work = manifests("j1", job_dir, cfg.worker_report_address, "t", s)
        pods = pod_specs(work)  # a TrainJob's: what it sets of its runtime's pods, as one pod spec
        if work["kind"] == "Job":
            validate_strictly([secret, work], "gpu job pod")
        for pod in pods:
            jc = pod["containers"][0]
            want = {"cpu": cfg.k8s_cpu, "memory": cfg.k8s_memory, GPU: str(max(nproc, cfg.k8s_gpus_per_pod))}
            assert jc["resources"]["requests"] == jc["resources"]["limits"] == want
            assert pod["nodeSelector"] == dict(x.split("=", 1) for x in cfg.k8s_node_selector)
            assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            assert {"name": "dshm", "mountPath": "/dev/shm"} in jc["volumeMounts"]
    serving, *_ = service_config(docs, "serving")
    assert serving["dtype"] in ("auto", "bfloat16") and serving["gpu_memory_utilization"] == 0.9
    assert serving["enable_prefix_caching"] is True
    _, sc = main_container(one(docs, "Deployment", "serving"))
    assert serving["tensor_parallel_size"] == int(sc["resources"]["limits"][GPU])


# -- network policies ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay, tmp_path):
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
        if name == "trainer" and "worker-report" in by_port:
            # overlays/gpu: the plaintext report port admits job pods (tunewire.dev/job), only them
            assert by_port.pop("worker-report") == [{"podSelector": {"matchExpressions": [
                {"key": "tunewire.dev/job", "operator": "Exists"}]}}]
            _, values = effective_config(docs, "trainer", tmp_path)
            assert values["worker_port"] and tls_on(values)
        # not the plaintext health port (components/security): kubelet probes need no rule;
        # serving's HTTP API: labelled clients only (tests/test_k8s_http.py)
        if name == "serving":
            assert by_port.pop("http") == [{"podSelector": {"matchLabels": CLIENT_LABEL}}]
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
