"""Fast checks of the kustomize components on top of the overlays: security (token + mTLS, on in
the GPU overlay: Secrets mounted read-only, the effective config pointing at them, probes on the
plaintext health port) and k8s-launcher (RBAC for Jobs and TrainJobs as training workers, exactly
what trainer_service/k8s_launcher.py calls as recorded by a fake API at the HTTP edge, rendered on
top of the CPU overlay).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml

from manifests import (K8S, OVERLAYS, SECRETS, SECRET_FILES, SERVING_CLIENT_FILES, containers,
                      effective_config, kustomize, main_container, mount_of, one, render,
                      scratch_overlay, service_config, tls_on, validate_strictly, workloads)
from trainer_service import k8s_launcher


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
    # serving: every probe on the plaintext health port, base's HTTP readiness probe replaced
    _, serving = effective_config(docs, "serving", tmp_path / "s")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "httpGet" not in c[kind] and c[kind]["grpc"]["port"] == serving["health_port"], kind


# -- components/k8s-launcher -----------------------------------------------------------------
READS_LOGS = ("", "pods/log", "get")  # granted for `kubectl logs` as the trainer; the launcher itself
                                     # reads worker.log on the shared volume (rbac.yaml)


def launcher_api_calls(tmp_path) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every request the launcher makes in its life: launches of a
    Job and a TrainJob, status reads, a cancel, a half-created launch undone, and a restart's
    orphan search, recorded by the fake API at the HTTP edge."""
    import asyncio

    from k8s_fake_api import PATH, FakeKubeApi
    from trainer_service.spec import Hyperparameters, JobSpec

    def job_dir(nodes):
        d = tmp_path / f"n{nodes}"
        d.mkdir()
        (d / "spec.json").write_text(JobSpec(base_model="/m", training_data="d.jsonl", adapter_name="a",
                                             hyperparameters=Hyperparameters(num_nodes=nodes, batch_size=2 * nodes))
                                     .to_json())
        return d

    async def life(api):
        launcher = k8s_launcher.KubernetesLauncher(k8s_launcher.K8sSettings(), api_client=api.client())
        for nodes in (1, 2):
            handle = await launcher.launch(job_id=f"j{nodes}", job_dir=job_dir(nodes), report_address="t:1",
                                           token="x", attempt=1)
            launcher.status(handle.name, handle.kind)
            handle.terminate()
        api.fail("POST", "secrets", 422, "invalid")
        with pytest.raises(k8s_launcher.LaunchError):
            await launcher.launch(job_id="j3", job_dir=tmp_path / "n1", report_address="t:1", token="x")
        await k8s_launcher.KubernetesLauncher(k8s_launcher.K8sSettings(), api_client=api.client()).stop_orphans([])

    with FakeKubeApi() as api:
        asyncio.run(life(api))
    groups = {"/api/v1": "", "/apis/batch/v1": "batch", "/apis/trainer.kubeflow.org/v1alpha1": "trainer.kubeflow.org"}
    calls = set()
    for method, path, _ in api.calls:
        m = PATH.match(path)
        group = next(g for prefix, g in groups.items() if path.startswith(prefix + "/"))
        verb = {"POST": "create", "DELETE": "delete"}[method] if method != "GET" else ("get" if m["name"] else "list")
        calls.add((group, m["res"] + ("/status" if m["status"] else ""), verb))
    return calls


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


def test_k8s_launcher_rbac_is_exactly_what_the_launcher_calls(launcher_docs, tmp_path):
    role = one(launcher_docs, "Role", "trainer-launcher")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no wildcards
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert "*" not in json.dumps(role["rules"])
    # exactly what the launcher calls, as the API sees it, and nothing more
    assert granted == launcher_api_calls(tmp_path) | {READS_LOGS}
    assert ("", "secrets", "list") not in granted and ("", "secrets", "get") not in granted
    s = k8s_launcher.K8sSettings()
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
    job = k8s_launcher.batch_job("tw-j1-a1", "j1", 1, Path("/data/jobs/j1"), "trainer:50051",
                                 k8s_launcher.K8sSettings())
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    train = k8s_launcher.train_job("tw-j1-a1", "j1", 1, Path("/data/jobs/j1"), "trainer:50051",
                                   k8s_launcher.K8sSettings(), num_nodes=2, nproc_per_node=1)
    assert train["spec"]["podTemplateOverrides"][0]["metadata"]["labels"] == job_labels  # TrainJob pods alike
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
