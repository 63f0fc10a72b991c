"""Fast checks of serving's OpenAI-compatible HTTP API (`http_port`) in the Kubernetes manifests,
rendered and read as tests/test_k8s.py does (tests/manifests.py: `kubectl kustomize`, offline):

- the effective config turns the HTTP API on, and the container declares it as port `http`;
  every port a Service, probe or NetworkPolicy names is a port the selected pod declares;
- the `serving` Service exposes it (`http`, 8000, appProtocol http); `serving-headless`, the
  trainer's handoff, stays gRPC-only;
- readiness: GET /health on `http` in base (503 until the engine is ready and while draining);
  under components/security (mTLS on every serving port: the kubelet has no client certificate)
  grpc.health.v1 on the plaintext health port, like startup and liveness;
- NetworkPolicy: the HTTP port admits labelled client pods (`tunewire.dev/client: "true"`) only,
  not the trainer, job pods, other pods, or the monitoring namespace.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import (CLIENT_LABEL, OVERLAYS, effective_config, kustomize, main_container, one,
                       render, scratch_overlay, selects, tls_on)
from trainer_service import k8s_launcher

pytestmark = pytest.mark.timeout(120)

HTTP_PORT = 8000  # the port the manifests, docs/operations.md and k8s/README.md give clients
NAMESPACE = {"kubernetes.io/metadata.name": "tunewire"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[tuple[str, list[dict]]]:
    """(name, rendered docs): both overlays, and the CPU one with components/security only
    (overlays/gpu has monitoring and k8s-launcher on top)."""
    overlay = scratch_overlay(tmp_path_factory.mktemp("http"), "cpu-security", "\n".join([
        "apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "namespace: tunewire",
        "resources:", "  - ../cpu", "components:", "  - ../../components/security", ""]))
    return [*((o, render(o)) for o in OVERLAYS), ("cpu+security", kustomize(overlay))]


def matches(selector: dict, labels: dict) -> bool:
    """A label selector as the API server reads it: matchLabels AND matchExpressions (In, NotIn,
    Exists, DoesNotExist); {} selects everything."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok &= {"Exists": has, "DoesNotExist": not has, "In": has and value in e.get("values", []),
               "NotIn": not has or value not in e.get("values", [])}[e["operator"]]
    return ok


def admitted(docs, dst: dict, src: dict, src_ns: dict = NAMESPACE) -> set:
    """The ports of the pod labelled `dst` (in tunewire) that a pod labelled `src` in a namespace
    labelled `src_ns` may reach, by the NetworkPolicies' semantics: isolated once any policy
    selects it, then the union of the rules that admit the source ("any" for a rule without ports)."""
    policies = [p for p in docs if p["kind"] == "NetworkPolicy" and matches(p["spec"]["podSelector"], dst)]
    assert policies, "no policy selects the pod: it would be open to everything"
    ports: set = set()
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer
                pods_ok = matches(peer.get("podSelector", {}), src)
                # a podSelector alone means this namespace; a namespaceSelector selects namespaces
                ns_ok = matches(peer["namespaceSelector"], src_ns) if "namespaceSelector" in peer \
                    else src_ns == NAMESPACE
                if pods_ok and ns_ok:
                    ports |= {x["port"] for x in rule.get("ports", [])} or {"any"}
    return ports


def window(probe: dict) -> int:
    """Seconds of consecutive failures before the probe acts (kubelet defaults: 10 s, 3)."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


# -- the port --------------------------------------------------------------------------------
def test_http_port_is_declared_and_every_port_reference_names_a_declared_port(variants, tmp_path):
    for where, docs in variants:
        _, values = effective_config(docs, "serving", tmp_path / where)
        assert values["http_port"] == HTTP_PORT, where
        pod, c = main_container(one(docs, "Deployment", "serving"))
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert declared["http"] == values["http_port"], where
        assert len(set(declared.values())) == len(declared), f"{where}: a port declared twice"
        labels = one(docs, "Deployment", "serving")["spec"]["template"]["metadata"]["labels"]
        # by name, as the manifests refer to ports: Services, the HTTP probe, policies
        refs = [p["targetPort"] for s in docs if s["kind"] == "Service"
                and selects(s["spec"]["selector"], labels) for p in s["spec"]["ports"]]
        refs += [c[k]["httpGet"]["port"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
                 if "httpGet" in c[k]]
        refs += [x["port"] for p in docs if p["kind"] == "NetworkPolicy"
                 and matches(p["spec"]["podSelector"], labels)
                 for r in p["spec"].get("ingress", []) for x in r.get("ports", [])]
        assert "http" in refs, where
        for ref in refs:
            assert ref in declared, f"{where}: port {ref!r} is not declared by the serving container"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_service_exposes_http_and_the_headless_one_stays_grpc(overlay):
    docs = render(overlay)
    ports = {p["name"]: p for p in one(docs, "Service", "serving")["spec"]["ports"]}
    assert ports["http"] == {"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"}
    assert ports["grpc"]["port"] != HTTP_PORT and ports["metrics"]["port"] != HTTP_PORT
    headless = one(docs, "Service", "serving-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert [p["name"] for p in headless["ports"]] == ["grpc"]  # the trainer's LoadAdapter handoff only


# -- probes ----------------------------------------------------------------------------------
def test_readiness_is_http_health_in_base_and_grpc_health_under_security(variants, tmp_path):
    """Base: readiness also proves the HTTP front end answers. With components/security every
    serving port (HTTP included) demands a client certificate the kubelet cannot present, so all
    three probes use the plaintext grpc.health.v1 port."""
    seen = set()
    for where, docs in variants:
        _, c = main_container(one(docs, "Deployment", "serving"))
        _, values = effective_config(docs, "serving", tmp_path / where)
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        ready = c["readinessProbe"]
        if not tls_on(values):
            seen.add("plain")
            assert {"grpc", "httpGet", "tcpSocket", "exec"} & set(ready) == {"httpGet"}, where
            get = ready["httpGet"]
            assert get["path"] == "/health" and get.get("scheme", "HTTP") == "HTTP", where
            assert declared[get["port"]] == values["http_port"], where
            assert not get.get("httpHeaders")  # /health needs no token
            grpc_port = values["port"]
        else:
            seen.add("tls")
            # mTLS: the reason readiness cannot stay on HTTP (TLS alone, the kubelet would skip
            # certificate checks and could probe https)
            assert values.get("tls_client_ca_file"), where
            assert "httpGet" not in ready, f"{where}: base's HTTP readiness probe survived the patch"
            assert ready["grpc"]["port"] == values["health_port"] == declared["health"], where
            grpc_port = values["health_port"]
        for kind in ("startupProbe", "livenessProbe"):
            assert set(c[kind]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{where} {kind}"
            assert c[kind]["grpc"]["port"] == grpc_port, f"{where} {kind}"
        # readiness fails faster than liveness: a draining or stalled replica leaves the
        # endpoints well before anything restarts it
        assert window(ready) < window(c["livenessProbe"]), where
    assert seen == {"plain", "tls"}


# -- network policy --------------------------------------------------------------------------
def test_http_is_admitted_from_labelled_client_pods_only(variants):
    job = k8s_launcher.batch_job("tw-j1-a1", "j1", 1, Path("/data/jobs/j1"), "trainer:50051",
                                 k8s_launcher.K8sSettings())
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    for where, docs in variants:
        serving, trainer = (one(docs, "Deployment", n)["spec"]["template"]["metadata"]["labels"]
                            for n in ("serving", "trainer"))
        client = {"app.kubernetes.io/name": "my-agent", **CLIENT_LABEL}
        assert admitted(docs, serving, client) == {"grpc", "http"}, where
        assert admitted(docs, serving, trainer) == {"grpc"}, where  # the handoff is gRPC
        assert admitted(docs, serving, {"app.kubernetes.io/name": "my-agent"}) == set(), where
        assert admitted(docs, serving, job_labels) == set(), where
        assert admitted(docs, serving, {}, MONITORING) == {"metrics"}, where
        # the label opens nothing from another namespace
        assert admitted(docs, serving, client, {"kubernetes.io/metadata.name": "other"}) == set(), where
