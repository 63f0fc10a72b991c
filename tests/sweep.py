"""The bad-input sweep's tools (tests/test_bad_input.py): every method of a set of gRPC services
found in their descriptors, bad request bytes for each, and generic calls that send raw bytes.

    for m in methods(*services):                    # path, kind, request class
        for case in cases(m, limit=...):            # name, messages (raw bytes), what to expect
            err = call(channel, m, case.messages, timeout=2)

Inputs (issue 16): random bytes (several seeds), the empty message, truncated bytes, valid bytes
of another message type, invalid UTF-8 in a string field, every number field at its extremes (all
at once and one at a time, on top of a valid `base` message where one is given), unknown enum
values, NaN/inf floats, one field making the message exactly the size limit and one byte over.
A method with a request stream also gets each bad message after a valid start (`start`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from tunewire.status import details

NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
TRUNCATED = b"\x0a\x05ab"  # field 1, 5 bytes long, then 2: no parser accepts it
MAX_DEPTH = 3  # nested messages filled this deep (Struct/Value nest without end)

F = FieldDescriptor
_INTS = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
         F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
         F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
         F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
         F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
         F.TYPE_ENUM: (-2**31, 2**31 - 1)}  # enums: values no enum defines
_EXTREMES = {"min": {F.TYPE_DOUBLE: -math.inf, F.TYPE_FLOAT: -math.inf, F.TYPE_BOOL: True,
                     F.TYPE_STRING: "", F.TYPE_BYTES: b""},
             "max": {F.TYPE_DOUBLE: math.inf, F.TYPE_FLOAT: math.inf, F.TYPE_BOOL: True,
                     F.TYPE_STRING: "../../\u0000\u00e9\U0001f600" * 3, F.TYPE_BYTES: b"\x00\xff" * 8},
             "nan": {F.TYPE_DOUBLE: math.nan, F.TYPE_FLOAT: math.nan, F.TYPE_BOOL: False,
                     F.TYPE_STRING: " ", F.TYPE_BYTES: b"\xff"}}


@dataclass(frozen=True)
class Method:
    path: str      # /package.Service/Method
    kind: str      # unary_unary, unary_stream, stream_unary or stream_stream (grpc's names)
    request: type  # the request message class

    @property
    def request_stream(self) -> bool:
        return self.kind.startswith("stream_")


@dataclass(frozen=True)
class Case:
    name: str
    messages: list[bytes]
    undecodable: bool = False  # must be INVALID_ARGUMENT REQUEST_UNDECODABLE
    too_large: bool = False    # must be RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE with limit_bytes
    at_limit: bool = False     # must not be refused for its size

    @property
    def must_refuse(self) -> bool:
        return self.undecodable or self.too_large


def methods(*services: ServiceDescriptor) -> list[Method]:
    out = []
    for s in services:
        for m in s.methods:
            kind = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
            out.append(Method(f"/{s.full_name}/{m.name}", kind, message_factory.GetMessageClass(m.input_type)))
    return out


def call(ch: grpc.Channel, m: Method, messages: list[bytes], timeout: float) -> grpc.RpcError | None:
    """Sends raw `messages` (one for a unary request) to `m`; the error, or None when it was OK.
    No serializers: the bytes go as they are, the answer's bytes are not parsed."""
    fn = getattr(ch, m.kind)(m.path)
    try:
        if m.kind == "unary_unary":
            fn(messages[0], timeout=timeout)
        elif m.kind == "unary_stream":
            list(fn(messages[0], timeout=timeout))
        elif m.kind == "stream_unary":
            fn(iter(messages), timeout=timeout)
        else:
            list(fn(iter(messages), timeout=timeout))
    except grpc.RpcError as e:
        return e
    return None


def error_info(e: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    return next((d for d in details(e) if isinstance(d, error_details_pb2.ErrorInfo)), None)


# -- messages ---------------------------------------------------------------------------------
def leaves(desc: Descriptor, depth: int = 0, prefix: tuple = ()) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Paths (field descriptors, outermost first) to every scalar field, nested MAX_DEPTH deep."""
    for f in desc.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth < MAX_DEPTH and not f.message_type.GetOptions().map_entry:
                yield from leaves(f.message_type, depth + 1, (*prefix, f))
        else:
            yield (*prefix, f)


def _value(f: FieldDescriptor, variant: str):
    if f.type in _INTS:
        lo, hi = _INTS[f.type]
        return {"min": lo, "max": hi, "nan": hi if f.type == F.TYPE_ENUM else lo}[variant]
    return _EXTREMES[variant][f.type]


def set_leaf(msg: Message, path: tuple[FieldDescriptor, ...], variant: str) -> bool:
    """Sets the field at `path` to its `variant` extreme (a repeated field gets one element);
    False where protobuf refuses the value (e.g. a closed enum)."""
    for f in path[:-1]:
        msg = getattr(msg, f.name).add() if f.is_repeated else getattr(msg, f.name)
    leaf = path[-1]
    try:
        if leaf.is_repeated:
            getattr(msg, leaf.name).append(_value(leaf, variant))
        else:
            setattr(msg, leaf.name, _value(leaf, variant))
    except (ValueError, TypeError):
        return False
    return True


def filled(cls: type, variant: str, base: Message | None = None) -> bytes:
    """Every scalar field (MAX_DEPTH deep) at its `variant` extreme."""
    msg = cls()
    if base is not None:
        msg.CopyFrom(base)
    for path in leaves(cls.DESCRIPTOR):
        set_leaf(msg, path, variant)
    return msg.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_path(desc: Descriptor, depth: int = 0) -> tuple[FieldDescriptor, ...] | None:
    """The first singular string field, looked for breadth first."""
    for f in desc.fields:
        if f.type == F.TYPE_STRING and not f.is_repeated:
            return (f,)
    if depth < 2:
        for f in desc.fields:
            if f.type == F.TYPE_MESSAGE and not f.is_repeated:
                sub = _string_path(f.message_type, depth + 1)
                if sub:
                    return (f, *sub)
    return None


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bad_utf8(cls: type) -> bytes | None:
    """The request with its first string field holding bytes that are not UTF-8."""
    path = _string_path(cls.DESCRIPTOR)
    if path is None:
        return None
    out = b"\xff\xfe\xc3("
    for f in reversed(path):
        out = _length_delimited(f.number, out)
    return out


def sized(cls: type, size: int) -> bytes:
    """A message of exactly `size` bytes: its first string field (or, without one, an unknown
    field, which every parser keeps) filled up."""
    path = _string_path(cls.DESCRIPTOR) or (None,)
    n = size
    for _ in range(4):  # the length prefixes grow with n: settle in a few rounds
        payload = b"a" * n
        for f in reversed(path):
            payload = _length_delimited(f.number if f else 2**29 - 1, payload)
        if len(payload) == size:
            return payload
        n -= len(payload) - size
    raise AssertionError(f"cannot size {cls.__name__} to {size}")


def cases(m: Method, others: list[Method], *, limit: int, base: Message | None = None,
          start: list[bytes] = (), seeds: int = 5, per_field: bool = True) -> list[Case]:
    """The bad inputs for `m`; `others` give valid bytes of another type; `start` the valid
    first messages of a request stream, after which each bad message comes again mid-stream."""
    cls = m.request
    base_bytes = base.SerializeToString() if base is not None else b""
    out = [Case("empty", [b""]), Case("truncated", [TRUNCATED], undecodable=True)]
    for seed in range(seeds):
        rng = random.Random(seed)
        out.append(Case(f"random-{seed}", [rng.randbytes(rng.choice((1, 7, 64, 300, 2000)))]))
    other = next(o for o in [*others[others.index(m) + 1:], *others] if o.request is not cls)
    out.append(Case(f"other-type-{other.request.__name__}", [filled(other.request, "max")]))
    utf8 = bad_utf8(cls)
    if utf8 is not None:
        out.append(Case("bad-utf8", [base_bytes + utf8], undecodable=True))
    for variant in ("min", "max", "nan"):
        out.append(Case(f"all-{variant}", [filled(cls, variant, base)]))
    if per_field:
        for path in leaves(cls.DESCRIPTOR):
            floating = path[-1].type in (F.TYPE_DOUBLE, F.TYPE_FLOAT)
            for variant in ("min", "max", "nan") if floating else ("min", "max"):
                msg = cls()
                if base is not None:
                    msg.CopyFrom(base)
                if set_leaf(msg, path, variant):
                    name = ".".join(f.name for f in path)
                    out.append(Case(f"{name}={variant}", [msg.SerializeToString()]))
    out.append(Case("at-limit", [sized(cls, limit)], at_limit=True))
    out.append(Case("over-limit", [sized(cls, limit + 1)], too_large=True))
    if m.request_stream and start:
        out += [Case(f"mid-stream-{c.name}", [*start, *c.messages], c.undecodable, c.too_large,
                     c.at_limit) for c in list(out)]
    return out
