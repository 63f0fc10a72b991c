"""Transport security for both services: bearer-token auth, TLS/mTLS, and the client channels.

Server side (`run_server` uses these when the settings are set; docs/operations.md "Security"):
- `ServerSecurity.from_config(cfg)` reads `auth_token_file`, `tls_cert_file`, `tls_key_file`
  and `tls_client_ca_file` from a service config; `.interceptors()` gives the token check,
  `.add_port(server, "host:port")` binds with TLS (mTLS when a client CA is set) or plaintext.
- `TokenAuthInterceptor` wants `authorization: Bearer <token>` on every RPC except health,
  reflection (probes, tooling) and the trainer's worker service (workers carry their per-job
  token in `x-tunewire-job-token` instead). Refusals are UNAUTHENTICATED with an ErrorInfo
  reason TOKEN_MISSING or TOKEN_INVALID, built by `status.status_of` like every other error.

Client side: `channel(address, ca_file=..., cert_file=..., key_file=..., token_file=...)` gives a
grpc.aio channel, `sync_channel(...)` the same for the CLI.

    tunewire serve trainer --tls-cert-file tls.crt --tls-key-file tls.key --auth-token-file token
    tunewire --tls-ca ca.crt --token-file token jobs list
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from tunewire import reasons as R
from tunewire.errors import TunewireError
from tunewire.status import status_of

log = logging.getLogger("tunewire.security")

# Reachable without the bearer token: probes and tooling must work without a secret, and the
# worker service checks its own per-job token (a worker never gets the service token).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
    "tunewire.trainer.v1.TrainerWorkerService",
})


def check_settings(cfg, prefix: str = "") -> None:
    """Validates one group of TLS/token settings on a config dataclass (called by __post_init__):
    `<prefix>auth_token_file` or `<prefix>token_file`, `<prefix>tls_cert_file`, ... whichever
    exist. A certificate needs its key and vice versa; every file that is set must exist."""
    get = lambda name: getattr(cfg, prefix + name, "")  # noqa: E731
    cert, key = get("tls_cert_file"), get("tls_key_file")
    if bool(cert) != bool(key):
        raise ValueError(f"{prefix}tls_cert_file and {prefix}tls_key_file must be set together")
    if get("tls_client_ca_file") and not cert:
        raise ValueError(f"{prefix}tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
    for name in ("auth_token_file", "token_file", "tls_cert_file", "tls_key_file",
                 "tls_client_ca_file", "tls_ca_file"):
        path = get(name)
        if path and not Path(path).is_file():
            raise ValueError(f"{prefix}{name}: no such file: {path}")


class _TokenFile:
    """The token in a file, re-read when the file changes: a Kubernetes Secret mounted as a
    volume is updated in place when it is rotated, without restarting the pod."""

    def __init__(self, path: str):
        self.path, self._stamp, self._token = Path(path), None, ""
        try:  # at start-up a missing or empty file is an error, not a warning
            self.path.read_text()
        except OSError as e:
            raise ValueError(f"token file {path}: {e.strerror or e}") from e
        if not self.get():
            raise ValueError(f"token file {path} is empty")

    def get(self) -> str:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._token = self.path.read_text().strip()
                self._stamp = (st.st_mtime_ns, st.st_size)
        except OSError as e:  # mid-rotation the file can vanish briefly: keep the last token
            log.warning("cannot read token file %s: %s", self.path, e)
        return self._token


class BearerToken:
    """The one check of an `authorization` value against the token file, for gRPC metadata and
    HTTP headers alike."""

    def __init__(self, token_file: str):
        self.token = _TokenFile(token_file)

    def check(self, header) -> TunewireError | None:
        """None when `header` (the authorization value, "" or None when absent) carries the token."""
        scheme, _, given = (header if isinstance(header, str) else "").partition(" ")
        if not header or (scheme.lower() == "bearer" and not given.strip()):
            return TunewireError(R.TOKEN_MISSING, "missing 'authorization: Bearer <token>'")
        # compare_digest: the time taken must not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.token.get().encode()):
            return TunewireError(R.TOKEN_INVALID, "invalid bearer token")
        return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without `authorization: Bearer <token>` (unary and streaming alike)."""

    def __init__(self, token_file: str):
        self.bearer = BearerToken(token_file)

    def check(self, metadata) -> TunewireError | None:
        return self.bearer.check(next((v for k, v in metadata or () if k == "authorization"), ""))

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.split("/")[1] in OPEN_SERVICES:
            return handler
        err = self.check(details.invocation_metadata)
        return handler if err is None else _refusal(handler, err)


def _unread(raw: bytes) -> bytes:
    return raw


def _refusal(handler: grpc.RpcMethodHandler, err: TunewireError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts with `err` (the servicer never
    runs, a client stream is never read)."""
    code, message, trailers = status_of(err)

    async def deny(_request, context):
        await context.abort(code, message, trailing_metadata=trailers)

    async def deny_stream(_request, context):  # an async generator, like the real handler
        await context.abort(code, message, trailing_metadata=trailers)
        yield  # pragma: no cover - unreachable

    # the request is never read, so never parsed: an unauthenticated caller learns nothing from
    # how its bytes parse (ServerInterceptor still refuses an over-size message first)
    ser = dict(request_deserializer=_unread, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **ser)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **ser)


@dataclass(frozen=True)
class ServerSecurity:
    """A service's security settings; empty strings = off (plaintext, no token)."""

    token_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # set = client certificates signed by this CA are required (mTLS)

    @classmethod
    def from_config(cls, cfg) -> ServerSecurity:
        return cls(token_file=cfg.auth_token_file, cert_file=cfg.tls_cert_file,
                   key_file=cfg.tls_key_file, client_ca_file=cfg.tls_client_ca_file)

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)

    def bearer(self) -> BearerToken | None:
        """The token check for other front ends (HTTP); None when no token is required."""
        return BearerToken(self.token_file) if self.token_file else None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.token_file)] if self.token_file else []

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Binds `address` with TLS when a certificate is set, else plaintext; the bound port."""
        if not self.tls:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials())


# -- client side ---------------------------------------------------------------------------------
# The token goes in by interceptor rather than call credentials: gRPC refuses call credentials
# on a plaintext channel, and a token without TLS (inside a cluster, or in tests) is allowed.
def _with_token(details, token: _TokenFile, metadata_cls):
    md = [*(details.metadata or ()), ("authorization", f"Bearer {token.get()}")]
    return details._replace(metadata=metadata_cls(*md) if metadata_cls else md)


class _Token:
    def __init__(self, token: _TokenFile):
        self.token = token


# One object per kind: grpc.aio files each interceptor under the first kind it matches.
class _AioUnaryUnary(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token, grpc.aio.Metadata), request)


class _AioUnaryStream(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token, grpc.aio.Metadata), request)


class _AioStreamUnary(_Token, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(_with_token(details, self.token, grpc.aio.Metadata), requests)


class _AioStreamStream(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(_with_token(details, self.token, grpc.aio.Metadata), requests)


class _SyncToken(_Token, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    # the sync channel, unlike grpc.aio, asks one interceptor object for every kind
    def _call(self, continuation, details, request):
        return continuation(_with_token(details, self.token, None), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


def _credentials_and_options(ca_file: str, cert_file: str, key_file: str, server_name: str,
                             options) -> tuple[grpc.ChannelCredentials | None, list]:
    options = list(options)
    if not (ca_file or cert_file):
        return None, options
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key (cert_file and key_file together)")
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    # no CA file: the system's trusted roots (a publicly signed server certificate)
    creds = grpc.ssl_channel_credentials(root_certificates=read(ca_file),
                                         private_key=read(key_file), certificate_chain=read(cert_file))
    if server_name:  # dialling an IP (one replica of a headless Service): check the cert's name
        options.append(("grpc.ssl_target_name_override", server_name))
    return creds, options


def channel(address: str, *, ca_file: str = "", cert_file: str = "", key_file: str = "",
            token_file: str = "", server_name: str = "", options=()) -> grpc.aio.Channel:
    """A grpc.aio channel: TLS when `ca_file` or `cert_file` is set (a client certificate for
    mTLS with `cert_file`/`key_file`), `authorization: Bearer` from `token_file` on every call.
    All empty = a plain insecure channel."""
    creds, opts = _credentials_and_options(ca_file, cert_file, key_file, server_name, options)
    interceptors = None
    if token_file:
        token = _TokenFile(token_file)
        interceptors = [cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary,
                                               _AioStreamStream)]
    if creds is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)


def sync_channel(address: str, *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 token_file: str = "", server_name: str = "", options=()) -> grpc.Channel:
    """`channel` for synchronous clients (the CLI)."""
    creds, opts = _credentials_and_options(ca_file, cert_file, key_file, server_name, options)
    ch = (grpc.insecure_channel(address, options=opts) if creds is None
          else grpc.secure_channel(address, creds, options=opts))
    return grpc.intercept_channel(ch, _SyncToken(_TokenFile(token_file))) if token_file else ch

