"""Domain exceptions; the API maps each to one HTTP status and the one JSON error shape."""

from __future__ import annotations


class RnnserveError(Exception):
    """Base class: `message` is shown to the client, `param` names the offending field."""

    type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(RnnserveError):
    type = "invalid_request_error"


class AuthenticationError(RnnserveError):
    type = "authentication_error"


class ForbiddenError(RnnserveError):
    """A valid key that may not do this (an API key on an admin route)."""

    type = "permission_error"


class NotFoundError(RnnserveError):
    type = "not_found_error"


class ConflictError(RnnserveError):
    type = "conflict_error"


class PayloadTooLargeError(RnnserveError):
    type = "payload_too_large_error"


class OverloadedError(RnnserveError):
    type = "overloaded_error"

    def __init__(self, message: str, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class UnavailableError(RnnserveError):
    type = "service_unavailable_error"


class CheckpointError(RnnserveError):
    """A checkpoint directory that is missing files, malformed, or fails its sha256 check."""

    type = "checkpoint_error"
