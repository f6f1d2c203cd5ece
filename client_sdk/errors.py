"""The exceptions the SDK raises. Host apps catch these, never `grpc.RpcError`.

LeptonError
├── ConnectionFailed      the server stayed unreachable past the reconnect timeout
├── ProtocolMismatch      client and server speak incompatible protocol versions
├── AuthenticationError   credentials refused (after a fresh Join was tried)
├── RunNotFound           the run named does not exist on this server
├── UpdateRejected        the server refused an update or report as invalid
├── RoundClosed           a result arrived after its round closed (slow client)
├── TrainingError         the app's own training or evaluation code raised
├── EnrollmentRefused     an enrollment token or request was refused (expired, used, foreign)
├── UnsupportedModelError local DP: a layer Opacus cannot privatise (client_sdk.privacy)
├── PrivacyBudgetExhausted local DP: the next round would exceed the target epsilon
└── ServerError           anything else the server answered (status code kept)
"""

from __future__ import annotations

import grpc


class LeptonError(Exception):
    """Base class of every SDK error; `code` is the gRPC status name when one caused it."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ConnectionFailed(LeptonError):
    pass


class ProtocolMismatch(LeptonError):
    pass


class AuthenticationError(LeptonError):
    pass


class RunNotFound(LeptonError):
    pass


class UpdateRejected(LeptonError):
    pass


class RoundClosed(LeptonError):
    pass


class TrainingError(LeptonError):
    pass


class EnrollmentRefused(LeptonError):
    pass


class ServerError(LeptonError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[LeptonError]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.NOT_FOUND: RunNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: UpdateRejected,
    grpc.StatusCode.PERMISSION_DENIED: UpdateRejected,
    grpc.StatusCode.ALREADY_EXISTS: UpdateRejected,
}


def from_rpc_error(error: grpc.RpcError, action: str) -> LeptonError:
    """The most specific SDK exception for a failed RPC."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        cls: type[LeptonError] = ProtocolMismatch if "protocol" in details else RoundClosed
    else:
        cls = _BY_CODE.get(code, ServerError)
    return cls(f"{action} failed: {details} ({code.name})", code.name)
