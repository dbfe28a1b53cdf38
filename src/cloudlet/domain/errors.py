"""The error tree every layer raises; the API turns it into Kubernetes ``Status`` bodies
and the CLI into exit codes, each in exactly one place."""

from __future__ import annotations


class CloudletError(Exception):
    """Base of every error Cloudlet raises on purpose.

    ``status`` is the HTTP status it maps to, ``reason`` the Kubernetes Status reason,
    ``user_fault`` whether the caller can fix it by changing the request.
    """

    status = 500
    reason = "InternalError"
    user_fault = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidError(CloudletError):
    """The request is malformed; ``field`` names the offending field."""

    status = 400
    reason = "Invalid"
    user_fault = True


class NotFoundError(CloudletError):
    status = 404
    reason = "NotFound"
    user_fault = True


class AlreadyExistsError(CloudletError):
    status = 409
    reason = "AlreadyExists"
    user_fault = True


class ConflictError(CloudletError):
    """A write based on a stale resourceVersion, or a state that forbids the change."""

    status = 409
    reason = "Conflict"
    user_fault = True


class UnauthorizedError(CloudletError):
    status = 401
    reason = "Unauthorized"
    user_fault = True


class ForbiddenError(CloudletError):
    status = 403
    reason = "Forbidden"
    user_fault = True


class UnavailableError(CloudletError):
    """A dependency (the container engine, for one) cannot be reached."""

    status = 503
    reason = "ServiceUnavailable"
