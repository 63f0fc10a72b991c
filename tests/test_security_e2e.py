"""End to end with security on: serving (real vLLM engine) and trainer (real training workers) as
subprocesses, both with mTLS + bearer token, and the trainer's handoff to serving over mTLS + token.

One engine start and one short LoRA job for the whole module:
- the job reaches SUCCEEDED with a metric per step, so the workers' progress reports reach a
  trainer whose main port speaks only TLS (they use its plaintext loopback report port);
- its result says serving loaded the adapter: the handoff dialled serving by IP over mTLS with the
  token, checking serving's certificate (DNS name `localhost` only) against `serving_address`;
- Generate on the adapter works over mTLS + token; without the token it is UNAUTHENTICATED
  (TOKEN_MISSING); a plaintext channel to serving's main port gets nowhere;
- both services are waited on through their plaintext `--health-port`;
- the OpenAI-compatible HTTP API on the same serving process takes the same TLS, client CA and
  token: the official `openai` client over HTTPS with a client certificate gets the adapter's
  answer (equal to gRPC's), 401 without the token; no client certificate or plain HTTP gets nowhere.

And a trainer on its own (no engine): config flags → run_server → a TLS port with a token, a
plaintext health-only port, the plaintext loopback port for worker reports, the CLI's client flags.

    .venv/bin/python -m pytest -q tests/test_security_e2e.py
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import expect_error, free_port, health_status, start_service, states, watch_all
from test_security import pki  # noqa: F401  (module-scoped fixture: throwaway CA, certs, token)
from tunewire.cli import main as cli_main
from tunewire.security import sync_channel
from tunewire.serving.v1 import serving_pb2 as spb
from tunewire.serving.v1 import serving_pb2_grpc
from tunewire.trainer.v1 import trainer_pb2 as tpb
from tunewire.trainer.v1 import trainer_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
ADAPTER = "secure-lora"
STEPS = 8


def _port(svc) -> str:
    return svc.proc.args[svc.proc.args.index("--port") + 1]


def _wait_on_health_port(svc, health_port: int, timeout: float) -> None:
    """harness.Service.wait_serving probes `svc.address` in plaintext: point it at the health port."""
    main = svc.address
    svc.address = f"127.0.0.1:{health_port}"
    try:
        svc.wait_serving(timeout)
    finally:
        svc.address = main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secdata") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(16):
            n, age = ["alice", "bob", "carol", "dave"][i % 4], 20 + i
            f.write(json.dumps({"prompt": f"{n} is {age} years old.\nJSON: ",
                                "completion": json.dumps({"name": n, "age": age})}) + "\n")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, pki):  # noqa: F811
    tmp = tmp_path_factory.mktemp("sec-e2e")
    store = tmp / "adapters"
    client_cert, client_key = pki["client@ca"]
    serving_health, trainer_health = free_port(), free_port()
    # serving's certificate names only `localhost`: the handoff, which dials 127.0.0.1, must
    # check it against the host name in --serving-address
    serving = start_service(
        "serving", tmp, "--model", str(tiny_model_dir), "--adapter-store", str(store),
        "--max-model-len", "256", "--enforce-eager", "--drain-seconds", "0.1",
        "--tls-cert-file", pki["server-by-name"][0], "--tls-key-file", pki["server-by-name"][1],
        "--tls-client-ca-file", pki["ca"], "--auth-token-file", pki["token"],
        "--health-port", str(serving_health), "--http-port", str(serving_http := free_port()))
    serving_address = f"localhost:{_port(serving)}"
    trainer = start_service(
        "trainer", tmp, "--data-dir", str(tmp / "trainer"), "--data-root", str(tmp.parent),
        "--adapter-store", str(store), "--drain-seconds", "0.1",
        "--tls-cert-file", pki["server"][0], "--tls-key-file", pki["server"][1],
        "--tls-client-ca-file", pki["ca"], "--auth-token-file", pki["token"],
        "--health-port", str(trainer_health),
        "--serving-address", serving_address, "--serving-tls-ca-file", pki["ca"],
        "--serving-tls-cert-file", client_cert, "--serving-tls-key-file", client_key,
        "--serving-token-file", pki["token"])
    try:
        _wait_on_health_port(trainer, trainer_health, 60)
        _wait_on_health_port(serving, serving_health, 300)
        tls = dict(ca_file=pki["ca"], cert_file=client_cert, key_file=client_key)
        channels = {
            "trainer": sync_channel(f"localhost:{_port(trainer)}", token_file=pki["token"], **tls),
            "serving": sync_channel(serving_address, token_file=pki["token"], **tls),
            "serving_no_token": sync_channel(serving_address, **tls),
        }
        yield dict(
            tmp=tmp, model=Path(tiny_model_dir), serving=serving, trainer=trainer,
            serving_port=_port(serving), serving_health=serving_health, serving_http=serving_http,
            tls=tls, token=Path(pki["token"]).read_text().strip(),
            jobs=trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]),
            gen=serving_pb2_grpc.ServingServiceStub(channels["serving"]),
            gen_no_token=serving_pb2_grpc.ServingServiceStub(channels["serving_no_token"]))
        for ch in channels.values():
            ch.close()
    finally:
        serving_rc, trainer_rc = serving.stop(), trainer.stop()
    assert (serving_rc, trainer_rc) == (0, 0), (serving.log()[-2000:], trainer.log()[-2000:])


@pytest.fixture(scope="module")
def trained(stack, dataset):
    spec = tpb.TrainingJob(
        base_model=str(stack["model"]), adapter_name=ADAPTER,
        training_data=tpb.DatasetRef(path=str(dataset)),
        lora=tpb.LoraMethod(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        hyperparameters=tpb.Hyperparameters(learning_rate=1e-2, max_steps=STEPS, batch_size=4,
                                            max_seq_length=64, seed=1))
    job = stack["jobs"].CreateTrainingJob(tpb.CreateTrainingJobRequest(
        training_job=spec, request_id="sec-e2e-1"), timeout=30).training_job
    entries = watch_all(stack["jobs"], job.id, timeout=300)
    final = stack["jobs"].GetTrainingJob(tpb.GetTrainingJobRequest(name=job.name), timeout=30).training_job
    return entries, final


def _generate(stub, **kw):
    return stub.Generate(spb.GenerateRequest(
        adapter=ADAPTER, prompt="alice is 21 years old.\nJSON: ",
        sampling=spb.SamplingParams(max_tokens=8)), timeout=120, **kw)


def test_job_over_tls_succeeds_and_hands_off_over_mtls_with_token(stack, trained):
    entries, final = trained
    assert states(entries) == ["QUEUED", "RUNNING", "PUBLISHING", "SUCCEEDED"], \
        (final.error, stack["trainer"].log()[-3000:])
    # every step's metric came back: worker → trainer progress reports work with TLS on
    metrics = [e.metric for e in entries if e.WhichOneof("payload") == "metric"]
    assert [m.step for m in metrics] == list(range(1, STEPS + 1))
    assert final.state == tpb.TrainingJob.STATE_SUCCEEDED
    assert final.result.serving_loaded, final.result.serving_message
    assert f"{ADAPTER}@{final.result.version}" in final.result.serving_message
    listed = stack["gen"].ListAdapters(spb.ListAdaptersRequest(), timeout=30).adapters
    assert (ADAPTER, final.result.version) in [(a.name, a.version) for a in listed]


def test_generate_needs_tls_and_the_token(stack, trained):
    _, final = trained
    r = _generate(stack["gen"])
    assert r.completion_tokens > 0 and r.finish_reason != spb.FINISH_REASON_UNSPECIFIED
    assert (r.adapter, r.adapter_version) == (ADAPTER, final.result.version)
    # the same call over the same mTLS, without the token
    expect_error(lambda: _generate(stack["gen_no_token"]), UNAUTH, "TOKEN_MISSING")
    # plaintext to serving's main (TLS) port gets no answer at all
    with grpc.insecure_channel(f"127.0.0.1:{stack['serving_port']}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            serving_pb2_grpc.ServingServiceStub(ch).Generate(spb.GenerateRequest(
                adapter=ADAPTER, prompt="x", sampling=spb.SamplingParams(max_tokens=1)), timeout=5)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(grpc.RpcError):  # nor does a plaintext health probe there
            health_status(f"127.0.0.1:{stack['serving_port']}")
    # the plaintext health port still answers, without a token
    assert health_status(f"127.0.0.1:{stack['serving_health']}") == health_pb2.HealthCheckResponse.SERVING


def test_the_http_api_takes_the_same_mtls_and_token(stack, trained):
    _, final = trained
    tls = stack["tls"]
    url = f"https://localhost:{stack['serving_http']}"
    context = ssl.create_default_context(cafile=tls["ca_file"])  # httpx 0.28 wants the client cert here
    context.load_cert_chain(tls["cert_file"], tls["key_file"])
    https = httpx.Client(verify=context, timeout=120)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=stack["token"], http_client=https, max_retries=0)
    r = client.completions.create(model=ADAPTER, prompt="alice is 21 years old.\nJSON: ", max_tokens=8,
                                  temperature=0)
    assert r.model == f"{ADAPTER}@{final.result.version}"
    assert r.choices[0].text == _generate(stack["gen"]).text  # gRPC, same request: the reference
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", http_client=https, max_retries=0).models.list()
    assert https.get(f"{url}/health").json() == {"status": "SERVING"}  # probes need no token
    https.close()
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(f"{url}/health", verify=ssl.create_default_context(cafile=tls["ca_file"]), timeout=10)
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{stack['serving_http']}/health", timeout=10)


def test_trainer_serves_mtls_with_a_token_and_a_plaintext_health_port(pki, tmp_path):  # noqa: F811
    """The real trainer process: config flags → run_server → TLS port + health-only port."""
    health_port = free_port()
    svc = start_service("trainer", tmp_path, "--data-root", str(tmp_path), "--data-dir",
                        str(tmp_path / "t"), "--adapter-store", str(tmp_path / "store"),
                        "--drain-seconds", "0.1", "--tls-cert-file", pki["server"][0],
                        "--tls-key-file", pki["server"][1], "--tls-client-ca-file", pki["ca"],
                        "--auth-token-file", pki["token"], "--health-port", str(health_port))
    try:
        svc.address = f"127.0.0.1:{health_port}"  # wait_serving probes plaintext: the health port
        svc.wait_serving(60)
        with pytest.raises(grpc.RpcError):  # plaintext to the TLS port
            health_status(f"127.0.0.1:{svc.proc.args[svc.proc.args.index('--port') + 1]}")
        address = f"localhost:{svc.proc.args[svc.proc.args.index('--port') + 1]}"
        client = pki["client@ca"]
        tls = dict(ca_file=pki["ca"], cert_file=client[0], key_file=client[1])
        with sync_channel(address, **tls) as ch:  # health over mTLS needs no token
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
                == health_pb2.HealthCheckResponse.SERVING
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            expect_error(lambda: stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(), timeout=5),
                         UNAUTH, "TOKEN_MISSING")
            watch = tpb.WatchTrainingJobRequest(name="x")
            expect_error(lambda: list(stub.WatchTrainingJob(watch, timeout=5)), UNAUTH, "TOKEN_MISSING")
            expect_error(lambda: stub.UploadDataset(iter([tpb.UploadDatasetRequest(
                header=tpb.UploadDatasetHeader(filename="d.jsonl"))]), timeout=5), UNAUTH, "TOKEN_MISSING")
        with sync_channel(address, token_file=pki["token"], **tls) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            assert stub.ListTrainingJobs(tpb.ListTrainingJobsRequest(), timeout=5).training_jobs == []
            expect_error(lambda: stub.GetTrainingJob(tpb.GetTrainingJobRequest(name="nope"), timeout=5),
                         grpc.StatusCode.NOT_FOUND)
        # workers report on a plaintext loopback port that serves only TrainerWorkerService
        reports = next(json.loads(line)["report_address"] for line in svc.log().splitlines()
                       if '"worker reports"' in line)
        with grpc.insecure_channel(reports) as ch:
            # an unknown job answers like a bad token: no probing which job ids exist
            expect_error(lambda: worker_pb2_grpc.TrainerWorkerServiceStub(ch).ReportProgress(
                worker_pb2.ReportProgressRequest(job_id="nope"), timeout=5), UNAUTH, "WORKER_TOKEN_INVALID")
            expect_error(lambda: trainer_pb2_grpc.TrainerServiceStub(ch).ListTrainingJobs(
                tpb.ListTrainingJobsRequest(), timeout=5), grpc.StatusCode.UNIMPLEMENTED)
        # the CLI's client flags
        assert cli_main(["--trainer", address, "--tls-ca", pki["ca"], "--tls-cert", client[0],
                         "--tls-key", client[1], "--token-file", pki["token"], "jobs", "list"]) == 0
        assert cli_main(["--trainer", address, "--tls-ca", pki["ca"], "--tls-cert", client[0],
                         "--tls-key", client[1], "jobs", "list"]) == 1
    finally:
        assert svc.stop() == 0, svc.log()[-3000:]
