"""Errors of the HTTP service, each with the status code and OpenAI-style error type it answers with."""

from __future__ import annotations


class ServeError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(ServeError):
    status = 404
    type = "not_found_error"


class Conflict(ServeError):
    """The request is well-formed but clashes with the stored state (other generator, too few tokens)."""

    status = 409
    type = "conflict_error"


class VersionConflict(Conflict):
    """A compare-and-swap write lost a race with another writer of the same context."""


class TooLarge(ServeError):
    status = 413
    type = "request_too_large"


class Invalid(ServeError):
    status = 422
    type = "invalid_request_error"


class Unavailable(ServeError):
    status = 503
    type = "overloaded_error"
