"""Record-level local differential privacy for `TorchTrainer`, on top of Opacus' DP-SGD.

Pass ``TorchTrainer(..., privacy=LocalDP(...))`` and every local step becomes a DP-SGD step
(Abadi et al. 2016) run by Opacus: each example's gradient is clipped to `max_grad_norm`,
Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added to the sum, and batches
are drawn by Poisson sampling at rate q = 1 / len(train_loader) (Opacus' `make_private`
defaults). The privacy unit is one training record of this client; the guarantee covers
everything the client ever sends (the weights it returns are post-processing).

Accounting is cumulative across FL rounds: the trainer keeps ONE `opacus.PrivacyEngine`,
whose accountant records every step of every round the client trains in, so the ``epsilon``
metric a fit reports is the client's total ε (at its δ) since the trainer was created.
Only "rdp" (default) and "prv" are offered: both are upper bounds for any history
(Opacus' "gdp" is an asymptotic approximation).

Two ways to set the noise (exactly one):

* ``noise_multiplier=σ``: fixed noise; ε just grows with every round and is reported.
* ``target_epsilon=ε, rounds=R``: a budget for the client's WHOLE participation, i.e. R
  fits (rounds this client trains in, not server rounds). σ is calibrated once, at the
  first fit, with Opacus' `get_noise_multiplier` for q = 1 / len(train_loader) and
  steps = R × E × steps_per_epoch, E being that first fit's local epochs (the server's
  ``local_epochs`` if it sends one, else the trainer's ``epochs``). The budget is then
  enforced on ε itself: before each fit the trainer asks the accountant what ε would be
  after it, and raises `PrivacyBudgetExhausted` (without training) if that exceeds
  `target_epsilon`. So ε ≤ target always holds, even if the server later asks for more
  epochs per round (then fewer than R rounds fit in the budget) or more rounds than R.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from client_sdk.errors import LeptonError
from client_sdk.training import LossFn

if TYPE_CHECKING:  # opacus costs seconds to import: load it only when DP is actually used
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizer

ACCOUNTANTS = ("rdp", "prv")


class UnsupportedModelError(LeptonError):
    """The model has layers DP-SGD cannot train (e.g. BatchNorm mixes examples within a batch)."""


class PrivacyBudgetExhausted(LeptonError):
    """Training once more would push this client's ε past its `LocalDP.target_epsilon`."""


def _positive(name: str, value: object, *, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise ValueError(f"{name} must be a {'whole number' if integer else 'number'}, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LocalDP:
    """Record-level DP-SGD settings for `TorchTrainer` (see the module docstring).

    max_grad_norm: per-example gradient clipping bound C (the L2 norm over all parameters).
    delta: the δ of the reported (ε, δ); should be well below 1 / (records on this client).
    noise_multiplier: noise std / C. Give this, or `target_epsilon` with `rounds`.
    target_epsilon: ε budget for the client's whole participation of `rounds` fits.
    rounds: how many fits (rounds this client trains in) the budget must cover.
    accountant: "rdp" (Rényi DP) or "prv" (PRV accountant: tighter, slower).
    fix_model: let Opacus' `ModuleValidator.fix` replace unsupported layers (e.g. BatchNorm →
        GroupNorm). The fixed model has other parameters and state_dict keys, so the app must
        build that same fixed model everywhere, the server's initial weights included (see
        `check_model`).
    """

    max_grad_norm: float
    delta: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None
    accountant: str = "rdp"
    fix_model: bool = False

    def __post_init__(self) -> None:
        _positive("max_grad_norm", self.max_grad_norm)
        if isinstance(self.delta, bool) or not isinstance(self.delta, int | float) or not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier)
            if self.rounds is not None:
                raise ValueError("rounds only applies with target_epsilon (it sizes the budget)")
        else:
            _positive("target_epsilon", self.target_epsilon)
            if self.rounds is None:
                raise ValueError("target_epsilon needs rounds: how many fits the budget must cover")
            _positive("rounds", self.rounds, integer=True)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if not isinstance(self.fix_model, bool):
            raise ValueError(f"fix_model must be True or False, got {self.fix_model!r}")


def _offending_layers(model: nn.Module) -> list[str]:
    """'path (Type)' of every layer Opacus refuses; [] when DP-SGD can train the model."""
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # Opacus validates a model in training mode; the mode itself is not a layer problem
    try:
        errors = ModuleValidator.validate(model, strict=False) + GradSampleModule.validate(model, strict=False)
        if not errors:
            return []
        named = [
            f"{name or '<root>'} ({type(module).__name__})"
            for name, module in trainable_modules(model)
            # the per-layer validators `ModuleValidator.validate` runs, and GradSampleModule's buffer check
            if (type(module) in ModuleValidator.VALIDATORS and ModuleValidator.VALIDATORS[type(module)](module))
            or any(True for _ in module.buffers(recurse=False))
        ]
        return named or [f"<model> ({e})" for e in errors]
    finally:
        model.train(was_training)


def check_model(model: nn.Module, fix: bool = False) -> nn.Module:
    """The model DP-SGD will train: `model` itself if Opacus accepts it, else its fix (`fix=True`).

    Raises `UnsupportedModelError` naming each offending layer (module path and type) when
    the model is not supported and `fix` is False, or when Opacus cannot fix it.

    A fixed model is a modified copy (BatchNorm becomes GroupNorm: fresh parameters and no
    running-stat buffers), so its state_dict no longer matches the original architecture.
    Federated training only works if the server's global model is that same fixed model:
    build it everywhere, e.g. ``build_model = lambda: check_model(Net(), fix=True)`` in the
    app, so the run's initial weights and every client agree on names and shapes.
    """
    from opacus.validators import ModuleValidator

    offending = _offending_layers(model)
    if not offending:
        return model
    layers = ", ".join(offending)
    if not fix:
        raise UnsupportedModelError(
            f"the model cannot be trained with local DP (DP-SGD): unsupported layers {layers}. "
            "Replace them (e.g. BatchNorm → GroupNorm/LayerNorm), or opt in to Opacus' automatic fix "
            "with LocalDP(..., fix_model=True) and build that fixed model on the server too"
        )
    fixed: nn.Module = ModuleValidator.fix(model)
    still = _offending_layers(fixed)
    if still:
        raise UnsupportedModelError(f"Opacus cannot fix these layers for local DP: {', '.join(still)}")
    return fixed


class PrivateTraining:
    """One trainer's DP-SGD state across FL rounds; `TorchTrainer` owns one when `privacy` is set.

    Holds the single `PrivacyEngine` (so the accountant accumulates over rounds) and the
    model's `GradSampleModule`, created at the first `make_private` and passed back to Opacus
    afterwards: `make_private` returns an existing GradSampleModule as is, so the model is
    wrapped exactly once, while each round gets a fresh `DPOptimizer` (around the optimizer
    the app's factory built for that round) and a fresh Poisson-sampling loader, both tied
    to the same accountant. `model` stays the plain module (shared parameters), so its
    state_dict keys carry no ``_module.`` prefix.
    """

    def __init__(self, dp: LocalDP, model: nn.Module, train_loader: object) -> None:
        if not isinstance(train_loader, DataLoader) or not isinstance(train_loader.dataset, Sized):
            raise ValueError("local DP needs train_loader to be a torch DataLoader over a map-style (sized) dataset")
        self.dp = dp
        self.model = model
        self.train_loader: DataLoader[Any] = train_loader
        self.num_examples = len(train_loader.dataset)
        if self.num_examples == 0 or len(train_loader) == 0:
            raise ValueError("the training data is empty")
        # Opacus' Poisson sampling rate (what make_private and its accountant hook use).
        self.sample_rate = 1 / len(train_loader)
        self.noise_multiplier: float | None = dp.noise_multiplier
        from opacus import PrivacyEngine

        # Opacus warns (once) that secure_mode is off: noise and sampling use torch's PRNG.
        self.engine: PrivacyEngine = PrivacyEngine(accountant=dp.accountant)
        self._wrapped: nn.Module | None = None

    @property
    def epsilon(self) -> float:
        """This client's cumulative ε at `dp.delta` over every step trained so far."""
        return float(self.engine.get_epsilon(self.dp.delta))

    def _steps_per_epoch(self) -> int:
        from opacus.data_loader import DPDataLoader

        return len(DPDataLoader.from_data_loader(self.train_loader))

    def _calibrate(self, epochs: int) -> float:
        from opacus.accountants.utils import get_noise_multiplier

        assert self.dp.target_epsilon is not None and self.dp.rounds is not None
        steps = self.dp.rounds * epochs * self._steps_per_epoch()
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=self.dp.target_epsilon,
                    target_delta=self.dp.delta,
                    sample_rate=self.sample_rate,
                    steps=steps,
                    accountant=self.dp.accountant,
                )
            )
        except ValueError as exc:
            raise ValueError(
                f"cannot reach target_epsilon={self.dp.target_epsilon} over {self.dp.rounds} rounds "
                f"of {epochs} epochs ({steps} steps at q={self.sample_rate:.4g}): {exc}"
            ) from exc

    def _epsilon_after(self, steps: int, noise_multiplier: float) -> float:
        accountant = copy.deepcopy(self.engine.accountant)
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate)
        return float(accountant.get_epsilon(self.dp.delta))

    def make_private(
        self, optimizer: torch.optim.Optimizer, epochs: int
    ) -> tuple[nn.Module, DPOptimizer, DataLoader[Any]]:
        """(model, optimizer, loader) for one fit of `epochs` epochs, all going through Opacus.

        Raises `PrivacyBudgetExhausted` when `target_epsilon` is set and this fit would exceed it.
        """
        if self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(epochs)
        sigma = self.noise_multiplier
        if self.dp.target_epsilon is not None:
            steps = epochs * self._steps_per_epoch()
            after = self._epsilon_after(steps, sigma)
            if after > self.dp.target_epsilon:
                raise PrivacyBudgetExhausted(
                    f"local DP budget spent: ε={self.epsilon:.4g} now, {after:.4g} after this round of "
                    f"{epochs} epochs > target_epsilon={self.dp.target_epsilon} (δ={self.dp.delta})"
                )
        module = self._wrapped if self._wrapped is not None else self.model
        module.train()
        wrapped, dp_optimizer, loader = self.engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=self.train_loader,
            noise_multiplier=sigma,
            max_grad_norm=self.dp.max_grad_norm,
            poisson_sampling=True,
        )
        self._wrapped = wrapped
        return wrapped, dp_optimizer, loader


def empty_batch_safe(loss_fn: LossFn) -> LossFn:
    """`loss_fn`, but 0 (still attached to the graph) on the empty batches Poisson sampling can draw.

    An empty batch is still a DP step (the noise is added and accounted for); a mean over zero
    examples would only turn the reported loss into NaN.
    """

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(targets) == 0:
            return outputs.sum() * 0.0
        result: torch.Tensor = loss_fn(outputs, targets)
        return result

    return loss
