"""Errors on the wire: a `TunewireError` as a gRPC status with `google.rpc.Status` details, and
the details read back from a failed call.

    code, message, trailers = status_of(err)          # server: context.abort(code, message, trailers)
    reason, fields = error_info(rpc_error)             # client: ErrorInfo.reason, BadRequest fields

The details are an `ErrorInfo` (reason, domain "tunewire", metadata), a `BadRequest` with the
field violations when there are any, and a `RetryInfo` when the error carries a retry delay.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tunewire.errors import TunewireError
from tunewire.reasons import DOMAIN

DETAILS_KEY = "grpc-status-details-bin"


def _packed(msg) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def status_of(err: TunewireError) -> tuple[grpc.StatusCode, str, tuple]:
    """(code, message, trailing metadata with google.rpc.Status details) for a domain error."""
    st = status_pb2.Status(code=getattr(code_pb2, err.code), message=err.message)
    st.details.append(_packed(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN,
                                                          metadata=err.metadata)))
    if err.field_violations:
        st.details.append(_packed(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in err.field_violations.items()])))
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        st.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return grpc.StatusCode[err.code], err.message, ((DETAILS_KEY, st.SerializeToString()),)


def details(call_error: grpc.RpcError) -> list:
    """The unpacked `google.rpc` detail messages of a failed call (ErrorInfo, BadRequest, ...)."""
    out = []
    for key, value in (call_error.trailing_metadata() or ()):
        if key != DETAILS_KEY:
            continue
        for d in status_pb2.Status.FromString(value).details:
            for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                        error_details_pb2.RetryInfo):
                if d.Is(cls.DESCRIPTOR):
                    msg = cls()
                    d.Unpack(msg)
                    out.append(msg)
    return out


def error_info(call_error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """Client side: (ErrorInfo.reason, BadRequest field -> description) from a failed call."""
    reason, fields = "", {}
    for d in details(call_error):
        if isinstance(d, error_details_pb2.ErrorInfo):
            reason = d.reason
        elif isinstance(d, error_details_pb2.BadRequest):
            fields.update({v.field: v.description for v in d.field_violations})
    return reason, fields
