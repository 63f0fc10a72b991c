"""Fast tests of token auth and TLS/mTLS (tunewire/security.py), on real grpc.aio servers in
this process on 127.0.0.1 with real certificates made here by a throwaway CA (`cryptography`).
The wiring config → CLI → run_server in real service processes: tests/test_security_e2e.py.

    .venv/bin/python -m pytest -q tests/test_security.py
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from trainer_service.config import TrainerConfig
from trainer_service.server import ServingHandoff
from tunewire.grpc_util import ServerInterceptor
from tunewire.status import error_info
from tunewire.security import ServerSecurity, channel
from tunewire.serving.v1 import serving_pb2, serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


# -- a throwaway PKI -------------------------------------------------------------------------------
def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, sans=()):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _write(d: Path, stem: str, cert, key) -> tuple[str, str]:
    (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(d / f"{stem}.crt"), str(d / f"{stem}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    files = {}
    for ca_name in ("ca", "other-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert(f"tunewire test {ca_name}", ca_key, ca=True)
        files[ca_name] = _write(d, ca_name, ca_cert, ca_key)[0]
        client_key = ec.generate_private_key(ec.SECP256R1())
        files[f"client@{ca_name}"] = _write(d, f"client-{ca_name}", _cert(
            "client", client_key, ca_cert, ca_key), client_key)
        if ca_name == "ca":
            key = ec.generate_private_key(ec.SECP256R1())
            files["server"] = _write(d, "server", _cert("server", key, ca_cert, ca_key, sans=[
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), key)
            files["server-by-name"] = _write(d, "server-by-name", _cert(  # no IP in its names
                "server", key, ca_cert, ca_key, sans=[x509.DNSName("localhost")]), key)
    (d / "token").write_text("s3cret-token\n")  # the newline a `kubectl create secret` file may have
    (d / "wrong").write_text("not-the-token")
    files["token"], files["wrong"] = str(d / "token"), str(d / "wrong")
    return files


# -- an in-process server built like run_server, with a small real TrainerService ----------------
class _Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    async def GetTrainingJob(self, request, context):
        return tpb.GetTrainingJobResponse(training_job=tpb.TrainingJob(id=request.name))

    async def WatchTrainingJob(self, request, context):
        for seq in (1, 2):
            yield tpb.WatchTrainingJobResponse(seq=seq)

    async def UploadDataset(self, requests, context):
        size = 0
        async for r in requests:
            size += len(r.chunk)
        return tpb.UploadDatasetResponse(size_bytes=size)


async def _server(sec: ServerSecurity):
    server = grpc.aio.server(interceptors=[ServerInterceptor(), *sec.interceptors()])
    port = sec.add_port(server, "127.0.0.1:0")
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(_Trainer(), server)
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _get(address: str, **client):
    async with channel(address, **client) as ch:
        return await trainer_pb2_grpc.TrainerServiceStub(ch).GetTrainingJob(
            tpb.GetTrainingJobRequest(name="j1"), timeout=5)


async def _code(coro) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), error_info(e)[0]
    return grpc.StatusCode.OK, ""


def _run(coro_fn, sec: ServerSecurity):
    async def main():
        server, address = await _server(sec)
        try:
            return await coro_fn(address)
        finally:
            await server.stop(0)
    return asyncio.run(main())


def test_tls_works_and_plaintext_is_refused(pki):
    async def scenario(address):
        assert (await _get(address, ca_file=pki["ca"])).training_job.id == "j1"
        assert (await _code(_get(address)))[0] == grpc.StatusCode.UNAVAILABLE  # plaintext
        # a server certificate from a CA the client does not trust
        assert (await _code(_get(address, ca_file=pki["other-ca"])))[0] == grpc.StatusCode.UNAVAILABLE

    _run(scenario, ServerSecurity(cert_file=pki["server"][0], key_file=pki["server"][1]))


def test_mtls_needs_a_client_certificate_from_the_client_ca(pki):
    async def scenario(address):
        good, foreign = pki["client@ca"], pki["client@other-ca"]
        assert (await _get(address, ca_file=pki["ca"], cert_file=good[0], key_file=good[1])).training_job.id
        assert (await _code(_get(address, ca_file=pki["ca"])))[0] == grpc.StatusCode.UNAVAILABLE
        code, _ = await _code(_get(address, ca_file=pki["ca"], cert_file=foreign[0], key_file=foreign[1]))
        assert code == grpc.StatusCode.UNAVAILABLE

    _run(scenario, ServerSecurity(cert_file=pki["server"][0], key_file=pki["server"][1],
                                  client_ca_file=pki["ca"]))


async def _health(address: str, **client):
    async with channel(address, **client) as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def test_token_missing_invalid_and_valid_over_plaintext_and_tls(pki):
    async def scenario(address, tls):
        assert await _code(_get(address, **tls)) == (UNAUTH, "TOKEN_MISSING")
        assert await _code(_get(address, token_file=pki["wrong"], **tls)) == (UNAUTH, "TOKEN_INVALID")
        assert (await _get(address, token_file=pki["token"], **tls)).training_job.id == "j1"
        # probes carry no token
        assert await _health(address, **tls) == health_pb2.HealthCheckResponse.SERVING
        async with channel(address, **tls) as ch:  # another scheme is not a bearer token
            call = trainer_pb2_grpc.TrainerServiceStub(ch).GetTrainingJob(
                tpb.GetTrainingJobRequest(name="j1"), metadata=(("authorization", "Basic czNjcmV0"),))
            assert await _code(call) == (UNAUTH, "TOKEN_INVALID")

    _run(lambda a: scenario(a, {}), ServerSecurity(token_file=pki["token"]))
    _run(lambda a: scenario(a, {"ca_file": pki["ca"]}),
         ServerSecurity(token_file=pki["token"], cert_file=pki["server"][0], key_file=pki["server"][1]))


def test_streaming_rpcs_need_the_token_too(pki):
    def upload():
        yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader(filename="d.jsonl"))
        yield tpb.UploadDatasetRequest(chunk=b"x" * 10)

    async def scenario(address):
        for token in ("", pki["wrong"], pki["token"]):
            async with channel(address, token_file=token) as ch:
                stub = trainer_pb2_grpc.TrainerServiceStub(ch)

                async def watch():
                    return [r.seq async for r in stub.WatchTrainingJob(
                        tpb.WatchTrainingJobRequest(name="j1"), timeout=5)]

                want = {"": (UNAUTH, "TOKEN_MISSING"), pki["wrong"]: (UNAUTH, "TOKEN_INVALID")}
                if token == pki["token"]:
                    assert await watch() == [1, 2]
                    assert (await stub.UploadDataset(upload(), timeout=5)).size_bytes == 10
                else:
                    assert await _code(watch()) == want[token]
                    assert await _code(stub.UploadDataset(upload(), timeout=5)) == want[token]

    _run(scenario, ServerSecurity(token_file=pki["token"]))


def test_a_rotated_token_file_is_picked_up(pki, tmp_path):
    token = tmp_path / "token"
    token.write_text("first")

    async def scenario(address):
        assert (await _get(address, token_file=str(token))).training_job.id == "j1"
        old = tmp_path / "old"
        old.write_text("first")
        token.write_text("second-longer")  # what kubelet does when the Secret changes
        assert await _code(_get(address, token_file=str(old))) == (UNAUTH, "TOKEN_INVALID")
        assert (await _get(address, token_file=str(token))).training_job.id == "j1"

    _run(scenario, ServerSecurity(token_file=str(token)))


def test_handoff_to_serving_uses_tls_and_token_and_checks_the_name(pki, tmp_path):
    """ServingHandoff dials each replica by IP; the certificate is checked against the name."""
    from tunewire import deployments

    class Serving(serving_pb2_grpc.ServingServiceServicer):
        async def LoadAdapter(self, request, context):
            assert request.stage  # the handoff stages first; the record deploys
            return serving_pb2.LoadAdapterResponse(adapter=serving_pb2.Adapter(
                name=request.name, version=request.version, rank=8))

        async def GetModelInfo(self, request, context):  # follows the record at once
            return serving_pb2.GetModelInfoResponse(
                replica_id="fake", deployment_generation=deployments.read(tmp_path).generation)

    async def main():
        sec = ServerSecurity(token_file=pki["token"], cert_file=pki["server-by-name"][0],
                             key_file=pki["server-by-name"][1], client_ca_file=pki["ca"])
        server = grpc.aio.server(interceptors=[ServerInterceptor(), *sec.interceptors()])
        port = sec.add_port(server, "127.0.0.1:0")
        serving_pb2_grpc.add_ServingServiceServicer_to_server(Serving(), server)
        await server.start()
        handoff = {"name": "a", "version": "v1", "uri": "/x", "manifest_sha256": "",
                   "adapter_store": tmp_path, "source": "trainingJobs/t"}
        try:
            client = pki["client@ca"]
            no_token = ServingHandoff(f"localhost:{port}", 5, ca_file=pki["ca"], cert_file=client[0],
                                      key_file=client[1])
            refused = await no_token.load_adapter(**handoff)
            assert refused.refused and "UNAUTHENTICATED TOKEN_MISSING" in refused.replicas[0].message
            assert deployments.read(tmp_path).generation == 0  # a refusal records nothing
            ok = ServingHandoff(f"localhost:{port}", 5, ca_file=pki["ca"], cert_file=client[0],
                                key_file=client[1], token_file=pki["token"])
            out = await ok.load_adapter(**handoff)
            assert "a@v1" in out.message and out.deployment_generation == 1, out
            assert [(r.replica_id, r.loaded, r.serving) for r in out.replicas] == [("fake", True, True)]
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_config_checks_the_security_settings(pki, tmp_path):
    cert, key = pki["server"]
    TrainerConfig(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki["ca"],
                  auth_token_file=pki["token"], health_port=50061, serving_tls_ca_file=pki["ca"])
    with pytest.raises(ValueError, match="set together"):
        TrainerConfig(tls_cert_file=cert)
    with pytest.raises(ValueError, match="serving_tls_cert_file and serving_tls_key_file"):
        TrainerConfig(serving_tls_cert_file=cert)
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        TrainerConfig(tls_client_ca_file=pki["ca"])
    with pytest.raises(ValueError, match="no such file"):
        TrainerConfig(auth_token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="serving_token_file: no such file"):
        TrainerConfig(serving_token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="health_port"):
        TrainerConfig(health_port=50051)
    from serving_service.config import ServingConfig

    with pytest.raises(ValueError, match="no such file"):
        ServingConfig(model="m", tls_cert_file=cert, tls_key_file=str(tmp_path / "missing"))
