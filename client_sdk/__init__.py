"""Lepton FL client SDK: embed `FederatedClient` + `TorchTrainer` in a partner app.

Depends only on `protos` and torch/grpc; never on the server or the simulation harness.
"""

from client_sdk.client import ClientStats, FederatedClient
from client_sdk.enrollment import Enrollment, enroll
from client_sdk.errors import (
    AuthenticationError,
    ConnectionFailed,
    EnrollmentRefused,
    LeptonError,
    ProtocolMismatch,
    RoundClosed,
    RunNotFound,
    ServerError,
    TrainingError,
    UpdateRejected,
)
from client_sdk.privacy import LocalDP, PrivacyBudgetExhausted, UnsupportedModelError, check_model
from client_sdk.trainer import TorchTrainer, Trainer
from client_sdk.training import EvalResult, FitResult
from client_sdk.transport import Backoff
from protos.channels import TLSFiles

__all__ = [
    "AuthenticationError",
    "Backoff",
    "ClientStats",
    "ConnectionFailed",
    "Enrollment",
    "EnrollmentRefused",
    "EvalResult",
    "FederatedClient",
    "FitResult",
    "LeptonError",
    "LocalDP",
    "PrivacyBudgetExhausted",
    "UnsupportedModelError",
    "check_model",
    "enroll",
    "ProtocolMismatch",
    "RoundClosed",
    "RunNotFound",
    "ServerError",
    "TLSFiles",
    "TorchTrainer",
    "Trainer",
    "TrainingError",
    "UpdateRejected",
]
