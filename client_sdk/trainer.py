"""`TorchTrainer`: what an app hands to `FederatedClient` to train a PyTorch model locally."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from client_sdk.training import (
    EvalResult,
    FitResult,
    LossFn,
    OptimizerFactory,
    evaluate_model,
    load_weights,
    sgd,
    snapshot,
    train_epochs,
)


class Trainer(Protocol):
    """Anything that can train and evaluate given global weights; `TorchTrainer` is the stock one."""

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult: ...

    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> EvalResult: ...


class TorchTrainer:
    """Wraps an `nn.Module`, its data and a training recipe.

    The server's task config may override the recipe per run: `local_epochs` replaces
    `epochs`, `proximal_mu` turns on FedProx's proximal term, and the whole config reaches
    `optimizer` (so `lr` can come from the run).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]],
        test_loader: DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        optimizer: OptimizerFactory = sgd,
        epochs: int = 1,
        loss_fn: LossFn = nn.functional.cross_entropy,
    ) -> None:
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        self.model = model
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.optimizer = optimizer
        self.epochs = epochs
        self.loss_fn = loss_fn

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        load_weights(self.model, weights)
        epochs = int(config.get("local_epochs", self.epochs))
        optimizer = self.optimizer(self.model.parameters(), config)
        mu = float(config.get("proximal_mu", 0.0))
        examples, loss = train_epochs(self.model, lambda: self.train_loader, optimizer, epochs, self.loss_fn, mu)
        if examples == 0:
            raise ValueError("the training data is empty")
        return FitResult(snapshot(self.model), examples, {"train_loss": loss})

    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> EvalResult:
        if self.test_loader is None:
            raise ValueError("TorchTrainer has no test_loader to evaluate on")
        load_weights(self.model, weights)
        return evaluate_model(self.model, self.test_loader, self.loss_fn)
