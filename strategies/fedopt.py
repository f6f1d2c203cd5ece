"""Server-optimizer members of the FedAvg family, and FedProx.

Every strategy here forms the example-weighted mean of the client models exactly as FedAvg
does (`MeanBasedStrategy`) and then, in `server_update`, treats

    Δ_t = mean_t − w_t                                   (the "pseudo-gradient")

as an update direction for a server-side optimizer. Note the sign: Δ points from the
current global model towards the clients' mean, so every rule *adds* a multiple of it.

* `fedavgm`    — server momentum (Hsu, Qi & Brown 2019, arXiv:1909.06335).
* `fedprox`    — FedAvg on the server, proximal term on the clients (Li et al. 2020, MLSys).
* `fedadagrad`, `fedadam`, `fedyogi` — adaptive server optimizers (Reddi et al. 2021,
  "Adaptive Federated Optimization", ICLR, arXiv:2003.00295, Algorithm 2).

Numerics: the mean arrives in the global model's dtype (it is what FedAvg would have
produced); Δ, the optimizer state and the update are computed in float64, and the new
weights are rounded once to the global model's dtype. Non-floating tensors (integer
buffers such as BatchNorm's `num_batches_tracked`) have no meaningful gradient: they take
the plain (rounded) mean and carry no optimizer state.

State (`state_dict`): `"step"` — how many server updates were applied (Adam's t) — and one
float64 tensor per floating model tensor and per optimizer slot, under flat keys
`"m/<tensor name>"` (first moment / momentum) and `"v/<tensor name>"` (second moment).
`load_state_dict` restores them exactly, so a restarted server continues bit for bit.

Differences from Flower (flwr 1.41, `flwr.server.strategy`), all checked in
`tests/unit/test_fedopt_flower.py`:

* FedAvgM: flwr stores the momentum of g = w − mean and steps w ← w − η m; we store the
  momentum of Δ = −g and step w ← w + η m. Same weights; our `m` state is flwr's negated.
  flwr's default momentum is 0 (plain FedAvg); ours is 0.9.
* FedOpt family: flwr starts v at 0; we start it at τ², the smallest value Algorithm 2
  allows (v₋₁ ≥ τ²). flwr's FedAdagrad fixes β₁ = 0 (no first-moment averaging); ours
  follows Algorithm 2 and uses β₁ (set `beta_1=0` to match flwr). flwr's FedAdam always
  bias-corrects its step size, with exponent `server_round + 1`; the paper does not
  bias-correct, so ours does not by default, and with `bias_correction=True` uses
  Kingma & Ba's exponent t = number of updates applied (1 for the first), i.e. flwr's
  round r corresponds to our step r + 1.
* Defaults: flwr's FedAdam/FedAdagrad use η = 0.1, τ = 1e-9; its FedYogi η = 0.01,
  τ = 1e-3. Ours are η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3 for all three.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from strategies.base import Scalar, StrategyState, Weights
from strategies.fedavg import MeanBasedStrategy
from strategies.registry import register_strategy

STEP_KEY = "step"


def _real(name: str, value: object) -> float:
    """`value` as a finite float; bools, strings and non-finite numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _positive(name: str, value: object) -> float:
    number = _real(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def _decay(name: str, value: object) -> float:
    number = _real(name, value)
    if not 0 <= number < 1:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}")
    return number


class ServerOptimizer(MeanBasedStrategy):
    """Base of the strategies that run an optimizer on the pseudo-gradient Δ = mean − global.

    Subclasses name their per-tensor state slots in `slots` and implement `_step`, which
    maps (t, w, Δ, previous slots) to (new w, new slots) in float64. This class owns the
    bookkeeping: which tensors are optimized, state initialisation and validation, dtype
    conversion and `state_dict` / `load_state_dict`. A round's state is committed only
    after every tensor was updated, so an error leaves the strategy as it was.
    """

    slots: ClassVar[tuple[str, ...]] = ("m",)

    def __init__(self) -> None:
        self._step_count = 0
        self._state: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self.slots}

    # ------------------------------------------------------------------ the update rule

    def _initial(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """A slot's value before the first update (default: zeros)."""
        return torch.zeros_like(like)

    @abstractmethod
    def _step(
        self, t: int, weights: torch.Tensor, delta: torch.Tensor, previous: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step on one tensor (all float64); t counts updates from 1."""

    def server_update(self, server_round: int, global_weights: Mapping[str, torch.Tensor], mean: Weights) -> Weights:
        optimized = [name for name, tensor in global_weights.items() if tensor.dtype.is_floating_point]
        self._check_state_fits(global_weights, optimized)
        t = self._step_count + 1
        out: Weights = dict(mean)
        new_state: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self.slots}
        for name in optimized:
            current = global_weights[name].detach()
            w = current.to(torch.float64)
            delta = mean[name].detach().to(device=w.device, dtype=torch.float64) - w
            previous = {
                slot: (self._state[slot][name].to(w.device) if self._step_count else self._initial(slot, w))
                for slot in self.slots
            }
            new_w, slots = self._step(t, w, delta, previous)
            out[name] = new_w.to(current.dtype)
            for slot in self.slots:
                new_state[slot][name] = slots[slot]
        self._state = new_state
        self._step_count = t
        return out

    def _check_state_fits(self, global_weights: Mapping[str, torch.Tensor], optimized: list[str]) -> None:
        if not self._step_count:
            return
        held = self._state[self.slots[0]]
        if set(held) != set(optimized):
            raise ValueError(
                f"{self.name} holds optimizer state for tensors {sorted(held)}, "
                f"but the global model's floating tensors are {sorted(optimized)}"
            )
        wrong = [n for n in optimized if held[n].shape != global_weights[n].shape]
        if wrong:
            raise ValueError(f"{self.name} optimizer state differs in shape from the global model for {wrong}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> StrategyState:
        state: StrategyState = {STEP_KEY: self._step_count}
        for slot in self.slots:
            for name, tensor in self._state[slot].items():
                state[f"{slot}/{name}"] = tensor.detach().to("cpu", copy=True)
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if not state:  # a fresh run
            self._step_count = 0
            self._state = {slot: {} for slot in self.slots}
            return
        if STEP_KEY not in state:
            raise ValueError(f"{self.name} state lacks {STEP_KEY!r}; got keys {sorted(state)}")
        step = state[STEP_KEY]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{self.name} state {STEP_KEY!r} must be a non-negative int, got {step!r}")
        loaded: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self.slots}
        for key, value in state.items():
            if key == STEP_KEY:
                continue
            slot, sep, name = key.partition("/")
            if not sep or slot not in loaded or not name:
                raise ValueError(f"{self.name} state has unexpected key {key!r}")
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                raise ValueError(f"{self.name} state {key!r} must be a floating-point tensor")
            loaded[slot][name] = value.detach().to("cpu", dtype=torch.float64, copy=True)
        names = {slot: set(tensors) for slot, tensors in loaded.items()}
        if any(n != names[self.slots[0]] for n in names.values()):
            raise ValueError(f"{self.name} state slots {list(self.slots)} cover different tensors")
        if step == 0 and names[self.slots[0]]:
            raise ValueError(f"{self.name} state has optimizer tensors but {STEP_KEY} = 0")
        for slot_name in names[self.slots[0]]:
            shapes = {loaded[slot][slot_name].shape for slot in self.slots}
            if len(shapes) != 1:
                raise ValueError(f"{self.name} state slots of {slot_name!r} differ in shape")
        self._step_count = step
        self._state = loaded


@register_strategy("fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum, FedAvgM (Hsu, Qi & Brown 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335).

        Δ_t = mean_t − w_t,    m_t = β m_{t−1} + Δ_t  (m_0 = 0),    w_{t+1} = w_t + η m_t

    Parameters:
        server_lr: η > 0, the server learning rate (default 1.0).
        momentum: β with 0 ≤ β < 1 (default 0.9, the usual SGD-momentum value). β = 0 and
            η = 1 is FedAvg (bit for bit on float32 models). Hsu et al. discuss the
            effective step size η / (1 − β).

    Sign convention: flwr's `FedAvgM` (following PyTorch's SGD) takes the pseudo-gradient
    as g = w − mean, a descent direction, keeps m ← β m + g (m = g in round 1) and steps
    w ← w − η m. Ours uses Δ = −g, so our momentum state is exactly flwr's negated and the
    weights are identical. flwr's default momentum is 0.0 (plain FedAvg); ours is 0.9.
    """

    slots = ("m",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = _positive("server_lr", server_lr)
        self.momentum = _decay("momentum", momentum)

    def _step(
        self, t: int, weights: torch.Tensor, delta: torch.Tensor, previous: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.momentum * previous["m"] + delta
        return weights + self.server_lr * m, {"m": m}


@register_strategy("fedprox")
class FedProx(MeanBasedStrategy):
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in
    Heterogeneous Networks", MLSys, arXiv:1812.06127).

    Each client minimises F_k(w) + μ/2 ‖w − w_t‖² instead of F_k(w); the server aggregates
    exactly as FedAvg (example-weighted mean), like flwr's `FedProx`. `configure_round`
    sends `{"proximal_mu": μ}`, which the client SDK's trainer turns into the proximal term.

    Parameters:
        proximal_mu: μ ≥ 0 (default 0.01; μ = 0 is FedAvg). Li et al. tune μ over
            {0.001, 0.01, 0.1, 1}.
    """

    def __init__(self, proximal_mu: float = 0.01) -> None:
        mu = _real("proximal_mu", proximal_mu)
        if mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu!r}")
        self.proximal_mu = mu

    def configure_round(self, server_round: int) -> dict[str, Scalar]:
        return {"proximal_mu": self.proximal_mu}


class AdaptiveServerOptimizer(ServerOptimizer):
    """FedOpt with an adaptive server optimizer (Reddi, Charles, Zaheer, Garrett, Rush,
    Konečný, Kumar & McMahan 2021, "Adaptive Federated Optimization", ICLR,
    arXiv:2003.00295, Algorithm 2), per coordinate:

        Δ_t = mean_t − w_t
        m_t = β₁ m_{t−1} + (1 − β₁) Δ_t                       (m_{−1} = 0)
        v_t = <rule of the subclass>                          (v_{−1} = τ²)
        w_{t+1} = w_t + η m_t / (√v_t + τ)

    Algorithm 2 takes v_{−1} ≥ τ²; we use τ², flwr uses 0. τ is the "degree of adaptivity":
    small τ gives a sign-like, per-coordinate step of size ≈ η; large τ makes the rule
    approach server SGD with momentum and step size η / τ.
    Δ_t here is the example-weighted mean of the client updates (as in FedAvg and flwr);
    Algorithm 2 writes the unweighted mean over the sampled clients.
    """

    slots = ("m", "v")

    def __init__(self, server_lr: float, beta_1: float, tau: float) -> None:
        super().__init__()
        self.server_lr = _positive("server_lr", server_lr)
        self.beta_1 = _decay("beta_1", beta_1)
        self.tau = _positive("tau", tau)

    def _initial(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        if slot == "v":
            return torch.full_like(like, self.tau**2)
        return torch.zeros_like(like)

    @abstractmethod
    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t−1} and Δ_t."""

    def _step_size(self, t: int) -> float:
        return self.server_lr

    def _step(
        self, t: int, weights: torch.Tensor, delta: torch.Tensor, previous: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.beta_1 * previous["m"] + (1 - self.beta_1) * delta
        v = self._second_moment(previous["v"], delta)
        new_weights = weights + self._step_size(t) * m / (v.sqrt() + self.tau)
        return new_weights, {"m": m, "v": v}


@register_strategy("fedadagrad")
class FedAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2):
    v_t = v_{t−1} + Δ_t². See `AdaptiveServerOptimizer` for the full rule.

    Parameters:
        server_lr: η > 0 (default 0.01; the paper tunes η per task on a log₁₀ grid).
        beta_1: β₁, 0 ≤ β₁ < 1 (default 0.9, as in Algorithm 2; flwr fixes 0).
        tau: τ > 0, the adaptivity degree (default 1e-3).

    Differences from flwr's `FedAdagrad`: flwr fixes β₁ = 0 (pass `beta_1=0` to match),
    starts v at 0 rather than τ², and defaults to η = 0.1, τ = 1e-9. β₂ plays no part in
    Adagrad, so there is no `beta_2` parameter.
    """

    def __init__(self, server_lr: float = 0.01, beta_1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta_1, tau)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta * delta


@register_strategy("fedadam")
class FedAdam(AdaptiveServerOptimizer):
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2):
    v_t = β₂ v_{t−1} + (1 − β₂) Δ_t². See `AdaptiveServerOptimizer` for the full rule.

    Parameters:
        server_lr: η > 0 (default 0.01; the paper tunes η per task on a log₁₀ grid).
        beta_1: β₁, 0 ≤ β₁ < 1 (default 0.9, also flwr's).
        beta_2: β₂, 0 ≤ β₂ < 1 (default 0.99, also flwr's).
        tau: τ > 0, the adaptivity degree (default 1e-3).
        bias_correction: scale η by √(1 − β₂ᵗ) / (1 − β₁ᵗ), t = 1, 2, ... the number of
            updates applied (Kingma & Ba 2015's step-size form). Default False, as in
            Algorithm 2, which has no bias correction.

    Differences from flwr's `FedAdam`: flwr always bias-corrects, with exponent
    `server_round + 1` (so its first round is corrected as if it were Adam's step 2 —
    our t = r + 1 for its round r); it starts v at 0 rather than τ²; and it defaults to
    η = 0.1, τ = 1e-9. We follow the paper by default so that fedadagrad, fedadam and
    fedyogi all implement Algorithm 2 as published (and the correction, derived for v
    starting at 0, is not exact with v starting at τ² anyway); the flag exists for users
    porting flwr configurations.
    """

    def __init__(
        self,
        server_lr: float = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ) -> None:
        super().__init__(server_lr, beta_1, tau)
        self.beta_2 = _decay("beta_2", beta_2)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be true or false, got {bias_correction!r}")
        self.bias_correction = bias_correction

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * (delta * delta)

    def _step_size(self, t: int) -> float:
        if not self.bias_correction:
            return self.server_lr
        return self.server_lr * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)


@register_strategy("fedyogi")
class FedYogi(AdaptiveServerOptimizer):
    """FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2; Yogi is
    Zaheer et al. 2018): v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²), so v moves
    towards Δ² by an additive step instead of Adam's multiplicative decay.
    See `AdaptiveServerOptimizer` for the full rule.

    Parameters:
        server_lr: η > 0 (default 0.01, also flwr's default for FedYogi).
        beta_1: β₁, 0 ≤ β₁ < 1 (default 0.9, also flwr's).
        beta_2: β₂, 0 ≤ β₂ < 1 (default 0.99, also flwr's).
        tau: τ > 0, the adaptivity degree (default 1e-3, also flwr's default for FedYogi).

    Difference from flwr's `FedYogi`: flwr starts v at 0 rather than τ² (for the first
    update sign(0 − Δ²) = −1, so flwr's v_0 = (1 − β₂) Δ², ours τ² + (1 − β₂) Δ²). No bias
    correction in either.
    """

    def __init__(self, server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta_1, tau)
        self.beta_2 = _decay("beta_2", beta_2)

    def _second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        square = delta * delta
        return v - (1 - self.beta_2) * square * torch.sign(v - square)
