"""Serving's OpenAI-compatible HTTP API: a Starlette app on uvicorn, in the serving process, on
its own port (`http_port`), in front of the same `Generator` (admission, adapters, structured
output, deadlines, metrics) as the gRPC servicer. Thin like the servicer: parse
(openai_protocol.py) → generate → format; errors become OpenAI's error JSON.

    tunewire serve serving --model DIR --http-port 8000
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \
      -d '{"model": "my-adapter", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], GET /health
(200 SERVING / 503 NOT_SERVING, the gRPC health status; no token). `HttpFrontend` is the
`tunewire.grpc_util.Frontend` that `run_server` binds, starts, marks serving and drains with the
gRPC server; it takes the bearer token and TLS settings of the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable

import uvicorn
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving_service import openai_protocol as oa
from serving_service.generation import Chunk, Generator
from serving_service.registry import AdapterRegistry
from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.logs import request_id_var
from tunewire.security import BearerToken, ServerSecurity

log = logging.getLogger("tunewire.http")
HTTP_REQUESTS = Counter("tunewire_http_requests_total", "HTTP API requests by route and status.",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("tunewire_http_request_seconds", "HTTP API request handling time (streams: "
                         "until the last event).", ["route"],
                         buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
_JSON = "application/json"


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _json(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, headers, media_type=_JSON)


def _error(e: TunewireError) -> Response:
    status, body, headers = oa.error_body(e)
    return _json(body, status, headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _merged(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from several generations at once, as each produces; the first
    error cancels the others (their engine requests are aborted)."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, s: AsyncIterator[Chunk]) -> None:
        try:
            async for c in s:
                queue.put_nowait((k, c, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, who raises it
            queue.put_nowait((k, None, e))
        else:
            queue.put_nowait((k, None, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            k, c, err = await queue.get()
            if err is not None:
                raise err
            if c is None:
                left -= 1
            else:
                yield k, c
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIApp:
    """The routes, over a Generator and the adapter registry."""

    def __init__(self, generator: Generator, registry: AdapterRegistry, *, base_name: str,
                 model_path: str, max_model_len: int, max_body_bytes: int,
                 bearer: BearerToken | None, serving: Callable[[], bool]):
        self.generator, self.registry = generator, registry
        self.base_name, self.model_path, self.max_model_len = base_name, model_path, max_model_len
        self.base_names = frozenset({base_name, model_path})  # vLLM's default name is the path
        self.max_body_bytes, self.bearer, self.serving = max_body_bytes, bearer, serving
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._route("chat", self.chat), methods=["POST"]),
            Route("/v1/completions", self._route("completions", self.completions), methods=["POST"]),
            Route("/v1/models", self._route("models", self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._route("model", self.model), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    def _route(self, name: str, handler):
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            request_id_var.set(rid)
            try:
                if self.bearer is not None and (err := self.bearer.check(request.headers.get("authorization"))):
                    raise err
                response = await handler(request, rid)
            except TunewireError as e:
                response = _error(e)
            except _ClientGone:
                response = Response(status_code=499)  # nobody reads it; counted and logged
            except Exception:  # noqa: BLE001 - a bug: logged here, never a traceback to the client
                log.exception("unhandled error in %s", request.url.path)
                response = _error(TunewireError(R.INTERNAL, "internal error"))
            response.headers["x-request-id"] = rid
            HTTP_REQUESTS.labels(name, request.method, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):
                HTTP_SECONDS.labels(name).observe(time.perf_counter() - started)
                log.info("http", extra={"route": request.url.path, "status": response.status_code,
                                        "ms": round(1000 * (time.perf_counter() - started), 1)})
            return response
        return endpoint

    async def health(self, request: Request) -> Response:
        ok = self.serving()
        return _json({"status": "SERVING" if ok else "NOT_SERVING"}, 200 if ok else 503)

    async def _body(self, request: Request) -> dict:
        size = int(request.headers.get("content-length") or 0)
        chunks = []
        async for part in request.stream():
            size = max(size, sum(map(len, chunks)) + len(part))
            if size > self.max_body_bytes:
                break
            chunks.append(part)
        if size > self.max_body_bytes:
            raise TunewireError(R.MESSAGE_TOO_LARGE, f"the request body is over the limit of "
                                f"{self.max_body_bytes} bytes", metadata={"limit_bytes": str(self.max_body_bytes)})
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise TunewireError(R.REQUEST_UNDECODABLE, f"the request body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise TunewireError(R.REQUEST_UNDECODABLE, "the request body must be a JSON object")
        return body

    async def chat(self, request: Request, rid: str) -> Response:
        body = await self._body(request)
        return await self._generate(request, oa.parse_chat(body, base_names=self.base_names, request_id=rid), rid)

    async def completions(self, request: Request, rid: str) -> Response:
        body = await self._body(request)
        return await self._generate(request, oa.parse_completion(body, base_names=self.base_names,
                                                                 request_id=rid), rid)

    async def _generate(self, request: Request, call: oa.Call, rid: str) -> Response:
        if call.stream:
            return await self._stream(request, call, rid)

        async def all_choices() -> list[Chunk]:
            try:
                async with asyncio.TaskGroup() as tg:  # the first error cancels the other choices
                    tasks = [tg.create_task(self.generator.complete(r)) for r in call.requests]
            except ExceptionGroup as group:  # the choices fail alike: answer the first's error
                raise group.exceptions[0] from None
            return [t.result() for t in tasks]

        finals = await _unless_disconnected(request, all_choices())
        return _json(oa.completion_body(call, finals, rid))

    async def _stream(self, request: Request, call: oa.Call, rid: str) -> Response:
        events = _merged([self.generator.stream(r) for r in call.requests])
        # The first chunk before the status line: refusals (unknown model, full queue, bad
        # schema) are still a proper HTTP status, not an error event in a 200 stream.
        try:
            first = await _unless_disconnected(request, anext(events))
        except BaseException:
            await events.aclose()
            raise
        started = time.perf_counter()

        async def body() -> AsyncIterator[bytes]:
            finals: list[Chunk | None] = [None] * len(call.requests)
            seen = set()
            status = "ok"
            try:
                item = first
                while True:
                    k, c = item
                    yield _sse(oa.stream_chunk(call, k, c, k not in seen, rid))
                    seen.add(k)
                    if c.finish_reason is not None:
                        finals[k] = c
                    try:
                        item = await anext(events)
                    except StopAsyncIteration:
                        break
                if call.include_usage:
                    yield _sse(oa.usage_chunk(call, finals, rid))
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                status = "cancelled"
                raise
            except TunewireError as e:  # after the 200: an error event, then the end
                status = str(e.reason)
                yield _sse(oa.error_body(e)[1])
            except Exception:  # noqa: BLE001
                status = "INTERNAL"
                log.exception("unhandled error in a stream")
                yield _sse(oa.error_body(TunewireError(R.INTERNAL, "internal error"))[1])
            finally:  # also when the client went away (Starlette cancels us): abort the rest
                await events.aclose()
                HTTP_SECONDS.labels("chat" if call.chat else "completions").observe(time.perf_counter() - started)
                log.info("http stream", extra={"route": request.url.path, "outcome": status,
                                               "ms": round(1000 * (time.perf_counter() - started), 1)})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def models(self, request: Request, rid: str) -> Response:
        return _json({"object": "list", "data": self._model_cards()})

    async def model(self, request: Request, rid: str) -> Response:
        name = request.path_params["model"]
        for card in self._model_cards():
            if card["id"] == name:
                return _json(card)
        raise TunewireError(R.MODEL_NOT_FOUND, f"the model {name!r} does not exist",
                            metadata={"model": name})

    def _model_cards(self) -> list[dict]:
        """The base model, then each adapter name and each loadable name@vN (resident or in
        the store; failed versions are left out)."""
        now = int(time.time())
        card = lambda id_, root, parent, created=now: {  # noqa: E731
            "id": id_, "object": "model", "created": created, "owned_by": "tunewire", "root": root,
            "parent": parent, "max_model_len": self.max_model_len}
        cards = [card(self.base_name, self.model_path, None)]
        names: dict[str, str] = {}
        versions = []
        for a in self.registry.list(include_store=True):
            if a.state == "FAILED":
                continue
            created = int(a.load_time or now)
            versions.append(card(f"{a.name}@{a.version}", a.path, self.base_name, created))
            if a.active or a.name not in names:
                names[a.name] = a.path
        cards += [card(n, p, self.base_name) for n, p in sorted(names.items())]
        return cards + sorted(versions, key=lambda c: c["id"])


async def _unless_disconnected(request: Request, awaitable):
    """`awaitable`'s result, or _ClientGone (and `awaitable` cancelled, so the engine request is
    aborted) when the client closes the connection first. Starlette only notices a disconnect
    while it streams, so a non-streaming answer watches for it here."""
    work = asyncio.ensure_future(awaitable)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


class _Server(uvicorn.Server):
    def capture_signals(self):  # run_server owns SIGTERM/SIGINT: no handlers of uvicorn's
        return contextlib.nullcontext()


class HttpFrontend:
    """The HTTP API as a `tunewire.grpc_util.Frontend`: bound with the gRPC ports, stopped with them."""

    def __init__(self, make_app: Callable[[Callable[[], bool]], OpenAIApp], *, host: str, port: int,
                 security: ServerSecurity):
        self.host, self.port, self.security = host, port, security
        self._serving = False
        self.api = make_app(lambda: self._serving)
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and without it Nagle holds each small SSE event until the client's delayed ACK (~40 ms
        # more time to first token than gRPC).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        self._socket = sock
        self.port = sock.getsockname()[1]

    async def start(self) -> None:
        sec = self.security
        config = uvicorn.Config(
            self.api.app, lifespan="off", access_log=False, log_config=None,
            timeout_keep_alive=30, ssl_certfile=sec.cert_file or None, ssl_keyfile=sec.key_file or None,
            ssl_ca_certs=sec.client_ca_file or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if sec.client_ca_file else ssl.CERT_NONE)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started and not self._task.done():  # bound already: this is quick
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what stopped it
        log.info("http listening", extra={"port": self.port, "tls": sec.tls})

    def set_serving(self, serving: bool) -> None:
        self._serving = serving

    async def stop(self, grace_seconds: float) -> None:
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = grace_seconds
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
