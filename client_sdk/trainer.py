"""`TorchTrainer`: what an app hands to `FederatedClient` to train a PyTorch model locally."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from client_sdk.privacy import LocalDP, PrivateTraining, check_model, empty_batch_safe
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
    `epochs`, `batch_size` re-batches the training `DataLoader`'s dataset (same shuffling
    and generator; loaders with a custom sampler, other iterables and local DP keep their
    own batches), `proximal_mu` turns on FedProx's proximal term, and the whole config
    reaches `optimizer` (so `lr` can come from the run). So a run trains clients with the
    batch size the simulation backends use for the same config.

    With `privacy=LocalDP(...)` every fit trains with record-level DP-SGD through Opacus
    (see `client_sdk.privacy`): the model is validated up front (`UnsupportedModelError`,
    or Opacus' fix with `fix_model=True`, which replaces `self.model`), `train_loader` must
    be a `DataLoader` over a sized dataset and `loss_fn` must average over the batch (the
    default does). One accountant spans all fits, and each fit's metrics add ``epsilon``
    (the client's cumulative ε at `privacy.delta`) and ``dp_noise_multiplier``.
    `num_examples` stays the dataset size (Poisson batches vary in size). FedProx still
    works: its proximal gradient μ(w − w_global) depends only on the weights, so it is added
    after Opacus has clipped and noised the data gradient (post-processing, no privacy cost).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]],
        test_loader: DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
        optimizer: OptimizerFactory = sgd,
        epochs: int = 1,
        loss_fn: LossFn = nn.functional.cross_entropy,
        privacy: LocalDP | None = None,
    ) -> None:
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        self.privacy = privacy
        self._private: PrivateTraining | None = None
        if privacy is not None:
            model = check_model(model, privacy.fix_model)
            self._private = PrivateTraining(privacy, model, train_loader)
        self.model = model
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.optimizer = optimizer
        self.epochs = epochs
        self.loss_fn = loss_fn
        self._rebatched: dict[int, DataLoader[Any]] = {}

    def _train_loader(self, config: Mapping[str, Any]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The training loader with the run's `batch_size`, when it has one and it can be applied."""
        loader = self.train_loader
        if "batch_size" not in config or not isinstance(loader, DataLoader) or loader.batch_size is None:
            return loader
        size = int(config["batch_size"])
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        if size == loader.batch_size or not isinstance(loader.sampler, RandomSampler | SequentialSampler):
            return loader
        if size not in self._rebatched:
            self._rebatched[size] = DataLoader(
                loader.dataset,
                batch_size=size,
                shuffle=isinstance(loader.sampler, RandomSampler),
                generator=loader.generator,  # the same random stream the app seeded
                collate_fn=loader.collate_fn,
                drop_last=loader.drop_last,
                num_workers=loader.num_workers,
            )
        return self._rebatched[size]

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        if self._private is not None:
            return self._fit_private(self._private, weights, config)
        load_weights(self.model, weights)
        epochs = int(config.get("local_epochs", self.epochs))
        optimizer = self.optimizer(self.model.parameters(), config)
        mu = float(config.get("proximal_mu", 0.0))
        train = self._train_loader(config)
        examples, loss = train_epochs(self.model, lambda: train, optimizer, epochs, self.loss_fn, mu)
        if examples == 0:
            raise ValueError("the training data is empty")
        return FitResult(snapshot(self.model), examples, {"train_loss": loss})

    def _fit_private(
        self, private: PrivateTraining, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> FitResult:
        try:
            load_weights(self.model, weights)
        except ValueError as exc:
            if private.dp.fix_model:
                raise ValueError(
                    f"{exc}; with LocalDP(fix_model=True) the server's model must be the same fixed "
                    "model (build it with client_sdk.privacy.check_model(model, fix=True) everywhere)"
                ) from exc
            raise
        epochs = int(config.get("local_epochs", self.epochs))
        if epochs < 1:
            raise ValueError("local_epochs must be at least 1")
        optimizer = self.optimizer(self.model.parameters(), config)
        mu = float(config.get("proximal_mu", 0.0))
        if mu > 0:
            _add_proximal_gradient(optimizer, self.model, mu)
        model, dp_optimizer, loader = private.make_private(optimizer, epochs)
        _, loss = train_epochs(model, lambda: loader, dp_optimizer, epochs, empty_batch_safe(self.loss_fn))
        dp_optimizer.zero_grad(set_to_none=True)  # drop the last batch's per-example gradients
        sigma = float(dp_optimizer.noise_multiplier)
        metrics = {"train_loss": loss, "epsilon": private.epsilon, "dp_noise_multiplier": sigma}
        return FitResult(snapshot(self.model), private.num_examples, metrics)

    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> EvalResult:
        if self.test_loader is None:
            raise ValueError("TorchTrainer has no test_loader to evaluate on")
        load_weights(self.model, weights)
        return evaluate_model(self.model, self.test_loader, self.loss_fn)


def _add_proximal_gradient(optimizer: torch.optim.Optimizer, model: nn.Module, mu: float) -> None:
    """FedProx under DP-SGD: add μ(w − w_global) to each gradient just before `optimizer` steps.

    Opacus replaces `p.grad` with the clipped, noised data gradient, so a proximal term put
    in the loss (as `train_epochs` does) would be dropped; hooking the optimizer Opacus wraps
    adds it to the privatized gradient instead. The anchors are the weights at entry.
    """
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    optimizer.register_step_pre_hook(hook)
