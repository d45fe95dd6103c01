"""Typed domain errors. The API layer maps each kind to one Connect code."""

from __future__ import annotations


class MetaldError(Exception):
    """Base of every error metald reports to a caller. The message is safe to show."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MetaldError):
    code = "invalid_argument"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(MetaldError):
    code = "not_found"


class NotYours(NotFound):
    """Answered exactly as NotFound (same code, same words: ids leak nothing), raised where
    the VM (or asset) exists but is another customer's, so that the API can count it as a
    refused access and log a security event."""


class AlreadyExists(MetaldError):
    code = "already_exists"


class PermissionDenied(MetaldError):
    code = "permission_denied"


class Unauthenticated(MetaldError):
    code = "unauthenticated"


class FailedPrecondition(MetaldError):
    code = "failed_precondition"


class ResourceExhausted(MetaldError):
    code = "resource_exhausted"


class Unimplemented(MetaldError):
    code = "unimplemented"


class Unavailable(MetaldError):
    code = "unavailable"


class BackendError(MetaldError):
    """The VMM misbehaved (failed to start, control socket broke). Reported as internal."""

    code = "internal"


class BillingUnavailable(Unavailable):
    """The billing service could not be reached, or answered so that the records may not
    have arrived: keep them and try again later."""


class BillingRejected(MetaldError):
    """The billing service answered and refused (success=false, or a Connect error other
    than unavailable): retrying the same call will not help."""
