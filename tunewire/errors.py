"""Domain errors, free of gRPC: domain code raises these, servicers map them to gRPC statuses.

Each error carries the canonical status name (INVALID_ARGUMENT, NOT_FOUND, ...), an UPPER_SNAKE
`reason` for `google.rpc.ErrorInfo`, and optional field violations for `google.rpc.BadRequest`.
`tunewire.grpc_util` does the mapping.
"""

from __future__ import annotations


class TunewireError(Exception):
    """Base class. `code` is a grpc.StatusCode name; `reason` is UPPER_SNAKE."""

    code = "INTERNAL"

    def __init__(self, reason: str, message: str, *, field_violations: dict[str, str] | None = None,
                 metadata: dict[str, str] | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field_violations = dict(field_violations or {})
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s  # becomes a google.rpc.RetryInfo hint


class InvalidArgument(TunewireError):
    code = "INVALID_ARGUMENT"


class NotFound(TunewireError):
    code = "NOT_FOUND"


class FailedPrecondition(TunewireError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(TunewireError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(TunewireError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(TunewireError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(TunewireError):
    code = "UNAVAILABLE"


class Unauthenticated(TunewireError):
    code = "UNAUTHENTICATED"


class Internal(TunewireError):
    code = "INTERNAL"


def invalid(field: str, problem: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """One-field INVALID_ARGUMENT, the most common case."""
    return InvalidArgument(reason, f"{field}: {problem}", field_violations={field: problem})


class JobFailure(Exception):
    """Raised inside a training worker: the job fails with this reason.

    `user_error` means the input (spec or data) is at fault; `retryable` means running the same
    job again may succeed.
    """

    def __init__(self, reason: str, message: str, *, user_error: bool = False,
                 retryable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.user_error = user_error
        self.retryable = retryable
