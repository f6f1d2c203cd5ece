"""Domain errors of the daemon. Servicers map each to one gRPC status code.

The engine raises these; it never imports grpc, so its logic is testable without a network
and a second transport could reuse it.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class: the message is sent to the caller as the status details."""


class InvalidArgument(ServerError):
    """Malformed request or update (wrong tensors, NaN, short stream, bad spec)."""


class NotFound(ServerError):
    """Unknown run, round, checkpoint or task."""


class PermissionDenied(ServerError):
    """The caller is known but not allowed to do this (e.g. upload for another assignment)."""


class Unauthenticated(ServerError):
    """Missing or wrong client credentials; the client should join again."""


class FailedPrecondition(ServerError):
    """The request is valid but the state does not allow it (round closed, protocol mismatch)."""


class AlreadyExists(ServerError):
    """A duplicate of something already accepted (e.g. a second upload for one task)."""


class ResourceExhausted(ServerError):
    """The request exceeds a configured limit (e.g. update size)."""


class Unavailable(ServerError):
    """The daemon is shutting down; retry later."""
