"""Errors of the HTTP service, each with the status, OpenAI error type and string code it answers with."""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, as OpenAI reports it


class Invalid(ServeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class TooLarge(Invalid):
    """More tokens than a limit allows (OpenAI answers a too-long prompt with 400 as well)."""

    code = "context_length_exceeded"


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ServeError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(ServeError):
    """The request is well-formed but clashes with the stored state (other generator, an unknown ledger item)."""

    status = 409
    type = "conflict_error"
    code = "conflict"


class VersionConflict(Conflict):
    """A compare-and-swap write lost a race with another writer of the same context."""


class QuotaExceeded(ServeError):
    status = 429
    type = "insufficient_quota"
    code = "quota_exceeded"


class Unavailable(ServeError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"
