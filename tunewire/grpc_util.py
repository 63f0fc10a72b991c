"""gRPC plumbing shared by both services: the server interceptor, `run_server`, `timestamp`.

- Servicers raise `tunewire.errors.TunewireError`; the interceptor turns it into the canonical
  status with `google.rpc` details (tunewire/status.py). Anything else becomes INTERNAL without
  a traceback for the client.
- The interceptor also counts and times every RPC (`grpc_server_handled_total`,
  `grpc_server_handling_seconds`) and logs one structured line per RPC with its request id.
- `run_server` wires health (NOT_SERVING until `startup` finishes and again while draining),
  reflection and the Prometheus HTTP endpoint, and turns SIGTERM/SIGINT into a graceful drain.
  With a `ServerSecurity` (tunewire/security.py) it binds with TLS/mTLS and checks the bearer
  token; `health_port` adds a plaintext, health-only listener for probes that cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.logs import request_id_var
from tunewire.security import ServerSecurity
from tunewire.status import status_of

log = logging.getLogger("tunewire.grpc")

HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                  ["grpc_service", "grpc_method", "grpc_code"])
LATENCY = Histogram("grpc_server_handling_seconds", "RPC handling time on the server.",
                    ["grpc_service", "grpc_method"],
                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))


def timestamp(unix: float | None) -> Timestamp | None:
    """A protobuf Timestamp for unix seconds; None (the field stays unset) for None or 0."""
    if not unix:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def _request_id(request, context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value
    rid = getattr(request, "request_id", "") if request is not None else ""
    return rid if isinstance(rid, str) and rid else uuid.uuid4().hex[:16]


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping + metrics + request-id logging around every unary and server-stream RPC."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.stream_stream:
            return handler
        _, service, method = details.method.split("/")
        # health probes, reflection and per-step worker reports: count them, but do not log each
        quiet = service.startswith("grpc.") or service.endswith(".TrainerWorkerService")

        @contextlib.asynccontextmanager
        async def guard(request, context):
            started = time.perf_counter()
            request_id_var.set(_request_id(request, context))
            code = grpc.StatusCode.OK
            try:
                yield
            except grpc.aio.AbortError:  # the servicer aborted by itself
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # noqa: BLE001 - mapped, never leaked as a traceback
                if not isinstance(e, TunewireError):
                    log.exception("unhandled error in %s", details.method)
                    e = TunewireError(R.INTERNAL, f"internal error: {type(e).__name__}")
                code, msg, trailers = status_of(e)
                await context.abort(code, msg, trailing_metadata=trailers)
            finally:
                elapsed = time.perf_counter() - started
                HANDLED.labels(service, method, code.name).inc()
                LATENCY.labels(service, method).observe(elapsed)
                if not quiet:
                    log.info("rpc", extra={"rpc": details.method, "code": code.name,
                                           "ms": round(1000 * elapsed, 1)})

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                async with guard(request, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        if handler.stream_unary:  # client streaming (uploads): the request is an async iterator
            inner_upload = handler.stream_unary

            async def upload(requests, context):
                async with guard(None, context):
                    return await inner_upload(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                upload, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream

        async def stream(request, context):
            async with guard(request, context):
                async for item in inner_stream(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def run_server(*, name: str, host: str, port: int, metrics_port: int,
                     add_servicers: Callable[[grpc.aio.Server, int], Iterable[str]],
                     startup: Callable[[], Awaitable[None]] | None = None,
                     drain: Callable[[], Awaitable[None]] | None = None,
                     shutdown: Callable[[], Awaitable[None]] | None = None,
                     drain_seconds: float = 5.0, stop_grace_seconds: float = 30.0,
                     max_message_bytes: int = 64 << 20,
                     security: ServerSecurity | None = None, health_port: int = 0) -> int:
    """Serves until SIGTERM/SIGINT, then drains: health NOT_SERVING for `drain_seconds` (load
    balancers notice while requests are still answered), then stop with `stop_grace_seconds`
    for in-flight RPCs, then `shutdown`. Returns the process exit status: 0 after a stop, 1 when
    a port cannot be bound or `startup` failed (the service then shuts down at once: Kubernetes
    restarts it)."""
    security = security or ServerSecurity()
    # the token check sits inside ServerInterceptor, so refusals are counted and logged too
    server = grpc.aio.server(interceptors=[ServerInterceptor(), *security.interceptors()], options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes)])
    health = HealthServicer()
    probes = grpc.aio.server() if health_port else None
    try:  # every port is bound before anything serves: one taken port = a clean exit status 1
        bound = security.add_port(server, f"{host}:{port}")
        services = list(add_servicers(server, bound))  # they may need the bound port (port 0)
        if probes:  # plaintext, health only: the same HealthServicer, so the same statuses
            health_pb2_grpc.add_HealthServicer_to_server(health, probes)
            probes.add_insecure_port(f"{host}:{health_port}")
        if metrics_port:
            start_http_server(metrics_port, addr=host)
    except (OSError, RuntimeError) as e:  # grpc raises RuntimeError("Failed to bind ...")
        log.error("start-up failed: %s", e, extra={"service": name, "port": port,
                                                   "metrics_port": metrics_port, "health_port": health_port})
        if shutdown:
            await shutdown()
        return 1
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for svc in ["", *services]:  # NOT_SERVING until startup() finishes
        await health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    await server.start()
    if probes:
        await probes.start()
    log.info("listening", extra={"service": name, "port": bound, "metrics_port": metrics_port,
                                 "tls": security.tls, "mtls": bool(security.client_ca_file),
                                 "token_auth": bool(security.token_file), "health_port": health_port})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def start_then_serve():
        if startup:
            await startup()
        for svc in ["", *services]:
            await health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"service": name})

    starter = asyncio.create_task(start_then_serve())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed = starter in done and starter.exception() is not None
    if failed:
        log.error("start-up failed: %s", starter.exception())
        stop.set()
        drain_seconds = 0.0  # nothing was served: no load balancer to warn
    await stop.wait()
    starter.cancel()
    stopper.cancel()
    log.info("draining", extra={"service": name, "drain_seconds": drain_seconds})
    await health.enter_graceful_shutdown()
    if drain:
        await drain()
    await asyncio.sleep(drain_seconds)
    await server.stop(stop_grace_seconds)
    if probes:
        await probes.stop(0)
    if shutdown:
        await shutdown()
    log.info("stopped", extra={"service": name, "exit_status": int(failed)})
    return int(failed)
