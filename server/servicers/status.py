"""One place that maps the engine's domain errors to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from server import errors

log = logging.getLogger("leptonfl.rpc")

STATUS_OF: dict[type[errors.ServerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

F = TypeVar("F", bound=Callable[..., Any])


def abort(context: grpc.ServicerContext, error: errors.ServerError) -> NoReturn:
    code = STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL)
    context.abort(code, str(error))
    raise AssertionError("unreachable: context.abort raises")


def _count(servicer: Any, method: str, code: grpc.StatusCode) -> None:
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.rpc_rejections.labels(method, code.name).inc()
        if method == "UploadUpdate":
            metrics.updates_rejected.labels(code.name).inc()


def _abort_on_error(servicer: Any, context: grpc.ServicerContext, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, errors.ServerError):
        log.info("%s refused: %s: %s", method, type(exc).__name__, exc)
        _count(servicer, method, STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL))
        abort(context, exc)
    _count(servicer, method, grpc.StatusCode.INTERNAL)
    log.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the daemon log")
    raise AssertionError("unreachable: context.abort raises")


def unary(method: F) -> F:
    """Turn domain errors of a unary handler into their status; anything else is INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if not context.is_active():
                # The caller hung up (e.g. a client vanished mid-upload): whatever it sent is dropped.
                log.info("%s abandoned: the caller went away (%s)", method.__name__, exc)
                context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
            if isinstance(exc, grpc.RpcError):
                raise
            _abort_on_error(self, context, method.__name__, exc)

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Same as `unary` for handlers that yield a response stream."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or not context.is_active():
                raise
            _abort_on_error(self, context, method.__name__, exc)

    return wrapper  # type: ignore[return-value]
