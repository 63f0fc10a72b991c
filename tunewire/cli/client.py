"""What every client command of `tunewire` shares: the addresses and TLS/token flags, the stubs,
printing a message as JSON, and turning a gRPC error into a readable line and exit status 1.

    tunewire [--trainer H:P] [--serving H:P] [--tls-ca F [--tls-cert F --tls-key F]] [--token-file F] ...

Each flag has an environment variable ($TUNEWIRE_TRAINER, $TUNEWIRE_SERVING, $TUNEWIRE_TLS_CA,
$TUNEWIRE_TLS_CERT, $TUNEWIRE_TLS_KEY, $TUNEWIRE_TOKEN_FILE); docs/operations.md "Security".
"""

from __future__ import annotations

import functools
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from tunewire.security import sync_channel
from tunewire.status import error_info

DEFAULT_TRAINER = "127.0.0.1:50051"
DEFAULT_SERVING = "127.0.0.1:50052"


def add_client_flags(p) -> None:
    p.add_argument("--trainer", default=os.environ.get("TUNEWIRE_TRAINER", DEFAULT_TRAINER),
                   help=f"trainer address [$TUNEWIRE_TRAINER, default {DEFAULT_TRAINER}]")
    p.add_argument("--serving", default=os.environ.get("TUNEWIRE_SERVING", DEFAULT_SERVING),
                   help=f"serving address [$TUNEWIRE_SERVING, default {DEFAULT_SERVING}]")
    # dest client_*: the client's side of TLS, never mistaken for a service's setting
    for flag, env, what in [("tls-ca", "TLS_CA", "CA of the services' TLS certificates"),
                            ("tls-cert", "TLS_CERT", "client certificate (mTLS)"),
                            ("tls-key", "TLS_KEY", "its private key"),
                            ("token-file", "TOKEN_FILE", "file with the bearer token")]:
        p.add_argument(f"--{flag}", dest="client_" + flag.replace("-", "_"),
                       default=os.environ.get(f"TUNEWIRE_{env}", ""), help=f"{what} [$TUNEWIRE_{env}]")


def channel_kwargs(args) -> dict:
    """The TLS/token settings of the command line, as tunewire.security's channels take them."""
    return dict(ca_file=args.client_tls_ca, cert_file=args.client_tls_cert,
                key_file=args.client_tls_key, token_file=args.client_token_file)


def trainer_stub(args):
    from tunewire.trainer.v1 import trainer_pb2_grpc

    return trainer_pb2_grpc.TrainerServiceStub(sync_channel(args.trainer, **channel_kwargs(args)))


def serving_stub(args):
    from tunewire.serving.v1 import serving_pb2_grpc

    return serving_pb2_grpc.ServingServiceStub(sync_channel(args.serving, **channel_kwargs(args)))


def print_message(msg) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def rpc_errors(fn):
    """A gRPC error becomes `error: CODE REASON: details` (+ one line per field violation) on
    stderr and exit status 1, instead of a traceback."""
    @functools.wraps(fn)
    def wrapped(args) -> int:
        try:
            return fn(args)
        except grpc.RpcError as e:
            reason, fields = error_info(e)
            print(f"error: {e.code().name} {reason}: {e.details()}", file=sys.stderr)
            for f, d in fields.items():
                print(f"  {f}: {d}", file=sys.stderr)
            return 1
    return wrapped
