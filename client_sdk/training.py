"""Local training and evaluation of a PyTorch model: the math every backend shares.

`TorchTrainer` (what apps embed) and the in-process simulation both call these
functions, so a simulated client trains exactly like a real one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter], Mapping[str, Any]], torch.optim.Optimizer]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FitResult:
    """What a client sends back: its trained weights, how many examples, and metrics."""

    weights: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def sgd(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Default optimizer: plain SGD with `lr` (default 0.05) and optional `momentum` from the config."""
    return torch.optim.SGD(params, lr=float(config.get("lr", 0.05)), momentum=float(config.get("momentum", 0.0)))


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy weights into the model in place (no reallocation), refusing any mismatch."""
    state = model.state_dict()
    if state.keys() != weights.keys():
        missing, extra = sorted(state.keys() - weights.keys()), sorted(weights.keys() - state.keys())
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(weights[name])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def train_epochs(
    model: nn.Module,
    batches: Callable[[], Batches],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    loss_fn: LossFn,
    proximal_mu: float = 0.0,
) -> tuple[int, float]:
    """Run `epochs` passes; returns (examples seen per epoch, mean data loss over the last epoch).

    With `proximal_mu` > 0 this is FedProx's local objective (Li et al. 2020): the loss gains
    (μ/2)‖w − w_global‖², w_global being the weights at entry. The reported loss is the data
    loss alone, so it stays comparable across strategies.
    """
    model.train()
    anchors = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    examples, loss_sum = 0, 0.0
    for _ in range(epochs):
        examples, loss_sum = 0, 0.0
        for inputs, targets in batches():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            objective = loss
            if anchors:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
                objective = loss + proximal_mu / 2 * drift
            objective.backward()
            optimizer.step()
            examples += len(targets)
            loss_sum += loss.item() * len(targets)
    return examples, (loss_sum / examples if examples else math.nan)


@torch.no_grad()
def evaluate_model(model: nn.Module, batches: Batches, loss_fn: LossFn) -> EvalResult:
    """Mean loss and, for classifiers (logits of shape [N, classes]), accuracy."""
    model.eval()
    examples, loss_sum, correct = 0, 0.0, 0
    for inputs, targets in batches:
        outputs = model(inputs)
        loss_sum += loss_fn(outputs, targets).item() * len(targets)
        if outputs.dim() == 2 and not targets.is_floating_point():
            correct += int((outputs.argmax(dim=1) == targets).sum())
        examples += len(targets)
    if examples == 0:
        raise ValueError("evaluation data is empty")
    return EvalResult(examples, loss_sum / examples, {"accuracy": correct / examples})
