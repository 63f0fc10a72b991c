"""Domain errors, free of gRPC: domain code raises `TunewireError`, the interceptor maps it.

    from tunewire import reasons as R
    from tunewire.errors import TunewireError, invalid

    raise TunewireError(R.QUEUE_FULL, "12 jobs are queued", retry_after_s=60)
    raise invalid("page_size", "must be in [0, 1000]")        # R.INVALID_FIELD + a field violation

Every reason is defined once in `tunewire/reasons.py`, with its canonical gRPC code and, for a
training job's error, whether the input is at fault and whether a retry may succeed. A training
worker raises the same errors and reports them as its job's error (`job_error()`) instead of a
status. `tunewire/status.py` turns an error into a `google.rpc.Status` (ErrorInfo, BadRequest,
RetryInfo) and back.
"""

from __future__ import annotations

from tunewire import reasons as R
from tunewire.reasons import Reason


class TunewireError(Exception):
    """An error with a catalogued reason; its status code is the reason's."""

    def __init__(self, reason: Reason, message: str, *, field_violations: dict[str, str] | None = None,
                 metadata: dict[str, str] | None = None, retry_after_s: float | None = None):
        if not isinstance(reason, Reason):  # a bare string would bypass the catalogue
            raise TypeError(f"reason must be a tunewire.reasons entry, not {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field_violations = dict(field_violations or {})
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s  # becomes a google.rpc.RetryInfo hint

    @property
    def code(self) -> str:
        """The canonical status name; a job-only reason that reaches an RPC is INTERNAL."""
        return self.reason.code or "INTERNAL"

    def job_error(self) -> dict:
        """As a training job's error (the JobError message's fields)."""
        return {"reason": str(self.reason), "message": self.message,
                "user_error": self.reason.user_error, "retryable": self.reason.retryable}


def invalid(field: str, problem: str, reason: Reason = R.INVALID_FIELD) -> TunewireError:
    """One-field INVALID_ARGUMENT (or another reason with that code), the most common case."""
    return TunewireError(reason, f"{field}: {problem}", field_violations={field: problem})
