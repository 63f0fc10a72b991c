"""gRPC plumbing shared by both services: the server interceptor, `run_server`, `timestamp`.

- Servicers raise `tunewire.errors.TunewireError`; the interceptor turns it into the canonical
  status with `google.rpc` details (tunewire/status.py). Anything else becomes INTERNAL without
  a traceback for the client.
- It also checks each request message first: over `max_message_bytes` is RESOURCE_EXHAUSTED
  MESSAGE_TOO_LARGE (`server_options` puts gRPC's own cap above it, so the client gets
  tunewire's details), bytes that do not parse are INVALID_ARGUMENT REQUEST_UNDECODABLE, on
  every method, request streams included; one log line, no traceback.
- The interceptor also counts and times every RPC (`grpc_server_handled_total`,
  `grpc_server_handling_seconds`) and logs one structured line per RPC with its request id.
- `run_server` wires health (NOT_SERVING until `startup` finishes and again while draining),
  reflection and the Prometheus HTTP endpoint, and turns SIGTERM/SIGINT into a graceful drain.
  With a `ServerSecurity` (tunewire/security.py) it binds with TLS/mTLS and checks the bearer
  token; `health_port` adds a plaintext, health-only listener for probes that cannot speak TLS.
  `frontends` (a `Frontend` each: serving's OpenAI-compatible HTTP API) are bound, started,
  marked serving and drained with the gRPC server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

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


# gRPC core refuses a message over its receive limit before any handler runs, with a bare status
# and none of tunewire's details. So the core limit sits above `max_message_bytes` and the
# interceptor refuses what lies between with MESSAGE_TOO_LARGE and the limit; the core limit stays
# a hard cap on what one message may cost in memory (docs/operations.md "Limits").
CORE_RECEIVE_LIMIT_HEADROOM = 1 << 20


def core_receive_limit(max_message_bytes: int) -> int:
    """gRPC core's receive limit for a service whose messages may be up to `max_message_bytes`."""
    return 2 * max_message_bytes + CORE_RECEIVE_LIMIT_HEADROOM


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The grpc.aio.server options for `max_message_bytes` (pair with ServerInterceptor(same)).
    Answers get the same hard cap: one may carry a request at the limit back (reflection echoes
    it), and a send over the cap fails with a bare status and an error in the log."""
    cap = core_receive_limit(max_message_bytes)
    return [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)]


class _BadRequest:
    """What a request deserializer returns instead of raising: raising there would answer
    UNKNOWN (INTERNAL mid-stream) with a traceback in the log, before any interceptor code runs.
    The wrapped behaviour raises `error` when it meets one."""

    __slots__ = ("error",)

    def __init__(self, error: TunewireError):
        self.error = error


def _checked_deserializer(deserialize, limit: int | None):
    """`deserialize` that turns an over-size or undecodable message into a `_BadRequest`."""
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request"

    def run(raw: bytes):
        if limit is not None and len(raw) > limit:
            return _BadRequest(TunewireError(
                R.MESSAGE_TOO_LARGE, f"a request message of {len(raw)} bytes is over the limit of "
                f"{limit} bytes", metadata={"limit_bytes": str(limit), "size_bytes": str(len(raw))}))
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8, too deep, ...
            return _BadRequest(TunewireError(
                R.REQUEST_UNDECODABLE, f"the request bytes are not a valid {type_name} message "
                f"({type(e).__name__})", metadata={"message_type": type_name}))
    return run


async def _checked_requests(requests):
    """A request stream that raises the error of the first bad message where it comes out."""
    async for request in requests:
        if isinstance(request, _BadRequest):
            raise request.error
        yield request


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping + metrics + request-id logging around every RPC, and the request checks:
    a message over `max_message_bytes` (None = no check) is RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE,
    bytes that do not parse are INVALID_ARGUMENT REQUEST_UNDECODABLE, for every kind of method
    (a bad message in a request stream fails the call where the servicer reads it)."""

    def __init__(self, max_message_bytes: int | None = None):
        self.max_message_bytes = max_message_bytes

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        _, service, method = details.method.split("/")
        # health probes, reflection and per-step worker reports: count them, but do not log each
        quiet = service.startswith("grpc.") or service.endswith(".TrainerWorkerService")
        ser = dict(request_deserializer=_checked_deserializer(handler.request_deserializer,
                                                              self.max_message_bytes),
                   response_serializer=handler.response_serializer)

        @contextlib.asynccontextmanager
        async def guard(request, context):
            started = time.perf_counter()
            request_id_var.set(_request_id(request, context))
            code, reason = grpc.StatusCode.OK, ""
            try:
                if isinstance(request, _BadRequest):
                    raise request.error
                yield
            except grpc.aio.AbortError:  # the servicer aborted by itself
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:  # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except NotImplementedError:
                if context.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise  # a bug: the handler below maps it to INTERNAL
                # a generated servicer base class without this method (e.g. Health.List)
                code = grpc.StatusCode.UNIMPLEMENTED
                await context.abort(code, f"{details.method} is not implemented")
            except Exception as e:  # noqa: BLE001 - mapped, never leaked as a traceback
                if not isinstance(e, TunewireError):
                    log.exception("unhandled error in %s", details.method)
                    e = TunewireError(R.INTERNAL, f"internal error: {type(e).__name__}")
                reason = str(e.reason)
                code, msg, trailers = status_of(e)
                await context.abort(code, msg, trailing_metadata=trailers)
            finally:
                elapsed = time.perf_counter() - started
                HANDLED.labels(service, method, code.name).inc()
                LATENCY.labels(service, method).observe(elapsed)
                # bad bytes are logged even on quiet services: one line, no traceback
                if not quiet or reason in (R.REQUEST_UNDECODABLE, R.MESSAGE_TOO_LARGE):
                    log.info("rpc", extra={"rpc": details.method, "code": code.name,
                                           "ms": round(1000 * elapsed, 1),
                                           **({"reason": reason} if reason else {})})

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                async with guard(request, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **ser)

        if handler.stream_unary:  # client streaming (uploads): the request is an async iterator
            inner_upload = handler.stream_unary

            async def upload(requests, context):
                async with guard(None, context):
                    return await inner_upload(_checked_requests(requests), context)

            return grpc.stream_unary_rpc_method_handler(upload, **ser)

        # A response stream comes from an async generator, or from a coroutine that calls
        # context.write (grpc's Health.Watch): the wrapper must be the same kind as the handler.
        if handler.stream_stream:  # reflection
            inner_bidi = handler.stream_stream

            async def bidi(requests, context):
                async with guard(None, context):
                    async for item in inner_bidi(_checked_requests(requests), context):
                        yield item

            async def bidi_writes(requests, context):
                async with guard(None, context):
                    await inner_bidi(_checked_requests(requests), context)

            return grpc.stream_stream_rpc_method_handler(
                bidi if inspect.isasyncgenfunction(inner_bidi) else bidi_writes, **ser)

        inner_stream = handler.unary_stream

        async def stream(request, context):
            async with guard(request, context):
                async for item in inner_stream(request, context):
                    yield item

        async def stream_writes(request, context):
            async with guard(request, context):
                await inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(
            stream if inspect.isasyncgenfunction(inner_stream) else stream_writes, **ser)


class Frontend(Protocol):
    """Another API on its own port, run beside the gRPC server by `run_server`."""

    def bind(self) -> None:
        """Takes the port (OSError when it cannot): called with the gRPC ports, before serving."""

    async def start(self) -> None:
        """Starts answering (requests before the engine is ready get 503, like gRPC's UNAVAILABLE)."""

    def set_serving(self, serving: bool) -> None:
        """Follows the health status: SERVING after start-up, NOT_SERVING while draining."""

    async def stop(self, grace_seconds: float) -> None:
        """Stops accepting, lets in-flight requests finish for up to `grace_seconds`, closes."""


# The process exit statuses run_server returns (tunewire/cli/serve.py adds 2: a bad setting);
# docs/operations.md "Start, health and shutdown" has the table.
EXIT_STOPPED = 0  # stopped by SIGTERM/SIGINT after a drain
EXIT_FAILED = 1   # could not start: a port that cannot be bound, `startup` failed
EXIT_DIED = 3     # served, then `watch` said it cannot serve any more (serving: the engine died)


async def run_server(*, name: str, host: str, port: int, metrics_port: int,
                     add_servicers: Callable[[grpc.aio.Server, int], Iterable[str]],
                     startup: Callable[[], Awaitable[None]] | None = None,
                     drain: Callable[[], Awaitable[None]] | None = None,
                     shutdown: Callable[[], Awaitable[None]] | None = None,
                     drain_seconds: float = 5.0, stop_grace_seconds: float = 30.0,
                     max_message_bytes: int = 64 << 20,
                     security: ServerSecurity | None = None, health_port: int = 0,
                     watch: Callable[[], Awaitable[str]] | None = None,
                     frontends: Sequence[Frontend] = ()) -> int:
    """Serves until SIGTERM/SIGINT, then drains: health NOT_SERVING for `drain_seconds` (load
    balancers notice while requests are still answered), then stop with `stop_grace_seconds`
    for in-flight RPCs, then `shutdown`. `watch`, awaited once `startup` finished, returns (why)
    when the service can no longer serve (serving's engine died): health turns NOT_SERVING at
    once, then the same drain and stop. Returns the process exit status: EXIT_STOPPED after a
    stop, EXIT_FAILED when a port cannot be bound or `startup` failed (the service then shuts
    down at once), EXIT_DIED after `watch` returned; Kubernetes restarts the last two."""
    security = security or ServerSecurity()
    # the token check sits inside ServerInterceptor, so refusals are counted and logged too
    server = grpc.aio.server(interceptors=[ServerInterceptor(max_message_bytes), *security.interceptors()],
                             options=server_options(max_message_bytes))
    health = HealthServicer()
    # the probe port gets the same edge (bad bytes, sizes) as the main one
    probes = grpc.aio.server(interceptors=[ServerInterceptor(max_message_bytes)],
                             options=server_options(max_message_bytes)) if health_port else None
    try:  # every port is bound before anything serves: one taken port = a clean exit status 1
        bound = security.add_port(server, f"{host}:{port}")
        services = list(add_servicers(server, bound))  # they may need the bound port (port 0)
        if probes:  # plaintext, health only: the same HealthServicer, so the same statuses
            health_pb2_grpc.add_HealthServicer_to_server(health, probes)
            probes.add_insecure_port(f"{host}:{health_port}")
        if metrics_port:
            start_http_server(metrics_port, addr=host)
        for frontend in frontends:
            frontend.bind()
    except (OSError, RuntimeError) as e:  # grpc raises RuntimeError("Failed to bind ...")
        log.error("start-up failed: %s", e, extra={"service": name, "port": port,
                                                   "metrics_port": metrics_port, "health_port": health_port})
        if shutdown:
            await shutdown()
        return EXIT_FAILED
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for svc in ["", *services]:  # NOT_SERVING until startup() finishes
        await health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    await server.start()
    if probes:
        await probes.start()
    for frontend in frontends:
        await frontend.start()
    log.info("listening", extra={"service": name, "port": bound, "metrics_port": metrics_port,
                                 "tls": security.tls, "mtls": bool(security.client_ca_file),
                                 "token_auth": bool(security.token_file), "health_port": health_port})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    served = False

    async def start_then_serve() -> int:
        nonlocal served
        if startup:
            await startup()
        for svc in ["", *services]:
            await health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        for frontend in frontends:
            frontend.set_serving(True)
        served = True
        log.info("serving", extra={"service": name})
        if watch is None:
            return await asyncio.Future()  # serves until stopped
        why = await watch()
        await health.enter_graceful_shutdown()  # NOT_SERVING now, before the drain
        for frontend in frontends:
            frontend.set_serving(False)
        log.error("cannot serve any more: %s", why, extra={"service": name})
        return EXIT_DIED

    starter = asyncio.create_task(start_then_serve())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    status = EXIT_STOPPED
    if starter in done:
        error = starter.exception()
        if error is not None and not served:
            log.error("start-up failed: %s", error)
        elif error is not None:  # watch() itself failed: the service cannot vouch for itself
            log.error("cannot serve any more: %s", error, extra={"service": name})
        status = EXIT_FAILED if error is not None and not served else EXIT_DIED
        stop.set()
    await stop.wait()
    if not served:  # stopped (or failed) during start-up: no load balancer to warn
        drain_seconds = 0.0
    starter.cancel()
    stopper.cancel()
    log.info("draining", extra={"service": name, "drain_seconds": drain_seconds})
    await health.enter_graceful_shutdown()
    for frontend in frontends:
        frontend.set_serving(False)
    if drain:
        await drain()
    await asyncio.sleep(drain_seconds)
    # both APIs stop together: in-flight requests on either get the same grace
    await asyncio.gather(server.stop(stop_grace_seconds),
                         *(frontend.stop(stop_grace_seconds) for frontend in frontends))
    if probes:
        await probes.stop(0)
    if shutdown:
        await shutdown()
    log.info("stopped", extra={"service": name, "exit_status": status})
    return status
