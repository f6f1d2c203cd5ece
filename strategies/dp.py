"""Central, user-level differential privacy for the FedAvg family.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"), optionally with adaptive clipping (Andrew et al. 2021, "Differentially Private
Learning with Adaptive Clipping"). The server is trusted; what is protected is every
model it releases, against the participation of any one client (user-level DP).

One round, with clip norm C, noise multiplier z and expected clients per round m:

1. Each client's update is Δ_k = w_k − w over the floating-point tensors, flattened
   into one vector for its L2 norm, and clipped: Δ_k · min(1, C / ‖Δ_k‖).
2. The clipped updates are summed *unweighted* (every client counts once, whatever its
   example count) in a running float64 buffer, so memory stays O(model).
3. Gaussian noise is added to the sum and it is divided by the *fixed* m, not by the
   number of updates that arrived (this is what bounds the sensitivity to C / m):
   Δ̄ = (Σ_k clip(Δ_k) + N(0, (z_Δ·C)² I)) / m.
4. The wrapped strategy applies its server update to the noisy mean model w + Δ̄:
   `inner.server_update(r, w, w + Δ̄)`, so DP composes with FedAvg, FedAvgM, FedAdam, …
   (a server optimizer is post-processing and costs no privacy).

Privacy accounting (see `strategies.accounting.PrivacyLedger`) charges each round one
subsampled Gaussian mechanism with noise multiplier z = `noise_multiplier` and sampling
rate q = m / population. The analysis assumes each client joins a round independently
with probability q; sampling a fixed number of clients is the usual approximation, and
fewer arrivals than m just shrink the step (the denominator stays m).

Adaptive clipping (Andrew et al., Algorithm 1 with the geometric update): besides the
clipped sum, the server releases the noisy fraction of clients whose update was not
clipped (b_k = 1 if ‖Δ_k‖ ≤ C), and moves C towards the γ-quantile of the update norms:

    b̄ = (Σ_k (b_k − ½) + N(0, σ_b²)) / m + ½,        C ← C · exp(−η_C (b̄ − γ)).

The indicators are centred on ½ as in the paper and TensorFlow Privacy's
QuantileEstimatorQuery, so the count query has sensitivity ½ and noise multiplier 2σ_b
(with every expected client arriving this is exactly (Σ b_k + N(0, σ_b²)) / m). To keep
the *total* noise multiplier of the two queries at z, the update query is run at
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), which exists only when z < 2σ_b; σ_b defaults to m / 20,
the paper's suggestion. So the ledger still records z per round.

Noise: each round draws from its own CPU `torch.Generator`. With ``seed=None`` (the
daemon) it is seeded from `secrets.randbits(63)`: cryptographically seeded and not
reproducible. With an integer seed (simulations) round r's generator is derived from
(seed, r) by SHA-256, so a run is reproducible and a restored strategy continues exactly
as an uninterrupted one. `torch.Generator` is a Mersenne Twister, not a CSPRNG, and
floating-point Gaussian sampling has known side channels (Mironov 2012); this is the same
level of care as Opacus' default (non-secure) mode, not a hardened implementation.

Non-floating tensors (e.g. BatchNorm's ``num_batches_tracked``) are NOT privatised: they
take FedAvg's example-weighted mean, rounded, as the non-private strategies do. Prefer
models without integer buffers (e.g. GroupNorm instead of BatchNorm) under DP. Client
metrics (train_loss, …) and example counts are not privatised either.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from typing import ClassVar

import torch

from strategies.base import ClientUpdate, RoundAggregate, Scalar, Strategy, StrategyState, Weights
from strategies.fedavg import MeanBasedStrategy

INNER = "inner"
INNER_PREFIX = "inner/"


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class ClippedSum(RoundAggregate):
    """Running Σ_k clip(w_k − w, C) over floating tensors (unweighted) and the clipped-count.

    Also keeps FedAvg's example-weighted sum for non-floating tensors, which are not
    privatised. `result()` is refused: the un-noised sum must never leave the server as a
    model; `CentralDP.finish_round` adds the noise.
    """

    def __init__(self, global_weights: Mapping[str, torch.Tensor], clip_norm: float) -> None:
        super().__init__()
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.num_unclipped = 0
        self._dtypes = {name: t.dtype for name, t in global_weights.items()}
        self._shapes = {name: t.shape for name, t in global_weights.items()}
        # float64 copies, so Δ of a float32 model carries no float32 rounding.
        self._reference = {
            name: t.detach().to(device="cpu", dtype=torch.float64, copy=True)
            for name, t in global_weights.items()
            if t.dtype.is_floating_point
        }
        self._delta_sums = {name: torch.zeros_like(ref) for name, ref in self._reference.items()}
        self._other_sums = {
            name: torch.zeros(t.shape, dtype=torch.float64)
            for name, t in global_weights.items()
            if not t.dtype.is_floating_point
        }

    @staticmethod
    def _norm(deltas: Mapping[str, torch.Tensor]) -> float:
        return math.hypot(*(float(torch.linalg.vector_norm(d)) for d in deltas.values()))

    def _fold(self, update: ClientUpdate) -> None:
        # Checked in full before anything is added, so a bad update leaves the sums untouched.
        if update.weights.keys() != self._shapes.keys():
            raise ValueError("update tensors differ from the global model's")
        wrong = [n for n, t in update.weights.items() if t.shape != self._shapes[n]]
        if wrong:
            raise ValueError(f"update tensors {wrong} differ in shape from the global model's")
        deltas = {
            name: update.weights[name].detach().to(device="cpu", dtype=torch.float64) - ref
            for name, ref in self._reference.items()
        }
        norm = self._norm(deltas)
        if not math.isfinite(norm):
            raise ValueError("update is not finite (NaN or infinite values)")
        unclipped = norm <= self.clip_norm
        for name, delta in deltas.items():
            if not unclipped:
                delta.mul_(self.clip_norm).div_(norm)
            self._delta_sums[name].add_(delta)
        for name, total in self._other_sums.items():
            total.add_(update.weights[name].detach().to(device="cpu", dtype=torch.float64) * update.num_examples)
        self.num_unclipped += int(unclipped)

    def _merge_state(self, other: RoundAggregate) -> None:
        assert isinstance(other, ClippedSum)
        if other.clip_norm != self.clip_norm:
            raise ValueError("partial sums clipped at different norms cannot be merged")
        for name, total in other._delta_sums.items():
            self._delta_sums[name].add_(total)
        for name, total in other._other_sums.items():
            self._other_sums[name].add_(total)
        self.num_unclipped += other.num_unclipped

    def clipped_sum(self) -> dict[str, torch.Tensor]:
        """Σ_k clip(Δ_k) so far, float64, floating tensors only (a copy; not private — tests/diagnostics)."""
        return {name: total.clone() for name, total in self._delta_sums.items()}

    def reference(self) -> dict[str, torch.Tensor]:
        """The float64 global floating tensors the deltas are taken against."""
        return self._reference

    def non_floating_mean(self) -> Weights:
        """Example-weighted, rounded mean of the non-floating tensors (not privatised)."""
        if self.num_updates == 0:
            raise ValueError("no update to aggregate")
        return {
            name: (total / self.num_examples).round().to(self._dtypes[name]) for name, total in self._other_sums.items()
        }

    def names(self) -> list[str]:
        return list(self._dtypes)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def result(self) -> Weights:
        raise RuntimeError("a ClippedSum holds the un-noised sum; the private model comes from CentralDP.finish_round")


class CentralDP(Strategy):
    """DP-FedAvg around any `MeanBasedStrategy`; see the module docstring.

    Not registered by name: hosts build it around the named strategy, e.g.
    ``CentralDP(create_strategy("fedadam", params), noise_multiplier=1.0, clip_norm=0.5, expected_clients=100)``.

    Args:
        inner: the strategy whose `server_update` turns the noisy mean model into the new global.
        noise_multiplier: z, the total noise multiplier charged to the privacy ledger per round.
        clip_norm: C for fixed clipping; must be None when ``adaptive=True``.
        expected_clients: m, the expected number of clients per round (the fixed denominator).
        adaptive: adapt C towards the ``target_quantile`` of update norms (Andrew et al. 2021).
        target_quantile: γ in (0, 1), the fraction of updates meant to stay unclipped.
        clip_lr: η_C > 0, the geometric learning rate of C.
        initial_clip_norm: C in round 1 when adaptive.
        clipped_count_stddev: σ_b, the std of the noise on the unclipped count (default m / 20).
        seed: None for cryptographically seeded noise, or an int for reproducible, resumable noise.
    """

    name: ClassVar[str] = "central_dp"

    def __init__(
        self,
        inner: MeanBasedStrategy,
        noise_multiplier: float,
        clip_norm: float | None,
        expected_clients: float,
        *,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        initial_clip_norm: float = 0.1,
        clipped_count_stddev: float | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(inner, MeanBasedStrategy):
            raise TypeError(f"central DP wraps a mean-based strategy (FedAvg family), got {type(inner).__name__}")
        self.inner = inner
        self._noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self._expected_clients = _positive("expected_clients", expected_clients)
        if isinstance(seed, bool) or not (seed is None or isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self._seed = seed
        self._adaptive = bool(adaptive)
        if not 0.0 < target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        self._target_quantile = float(target_quantile)
        self._clip_lr = _positive("clip_lr", clip_lr)
        z = self._noise_multiplier
        self._clipped_count_stddev: float | None
        if self._adaptive:
            if clip_norm is not None:
                raise ValueError("with adaptive clipping set initial_clip_norm, not clip_norm")
            self._clip_norm = _positive("initial_clip_norm", initial_clip_norm)
            sigma_b = self._expected_clients / 20 if clipped_count_stddev is None else clipped_count_stddev
            sigma_b = _positive("clipped_count_stddev", sigma_b)
            if z >= 2 * sigma_b:
                raise ValueError(
                    f"adaptive clipping splits the noise multiplier z={z:g} between the update and the "
                    f"clipped count (noise multiplier 2·σ_b = {2 * sigma_b:g}); the update's share "
                    f"z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) exists only if z < 2·σ_b. Raise clipped_count_stddev "
                    f"(default expected_clients / 20) above {z / 2:g}, or lower noise_multiplier"
                )
            self._clipped_count_stddev = sigma_b
            self._update_noise_multiplier = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
        else:
            if clip_norm is None:
                raise ValueError("fixed clipping needs clip_norm (or pass adaptive=True)")
            self._clip_norm = _positive("clip_norm", clip_norm)
            if clipped_count_stddev is not None:
                raise ValueError("clipped_count_stddev only applies with adaptive=True")
            self._clipped_count_stddev = None
            self._update_noise_multiplier = z
        self._rounds = 0
        self.last_clip_norm: float | None = None
        self.last_noise_std: float | None = None
        self.last_num_clients: int | None = None
        self.last_unclipped_fraction: float | None = None
        self.last_noisy_unclipped_fraction: float | None = None

    # ------------------------------------------------------------------------ properties

    @property
    def clip_norm(self) -> float:
        """C for the next round."""
        return self._clip_norm

    @property
    def noise_multiplier(self) -> float:
        """z, the noise multiplier to record in the privacy ledger each round."""
        return self._noise_multiplier

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ, the noise multiplier actually applied to the clipped sum (z without adaptive clipping)."""
        return self._update_noise_multiplier

    @property
    def expected_clients(self) -> float:
        return self._expected_clients

    @property
    def adaptive(self) -> bool:
        return self._adaptive

    @property
    def clipped_count_stddev(self) -> float | None:
        """σ_b with adaptive clipping, else None."""
        return self._clipped_count_stddev

    @property
    def rounds(self) -> int:
        """Rounds finished (including rounds restored from state)."""
        return self._rounds

    def diagnostics(self) -> dict[str, float]:
        """Last round's values for round metrics (empty before the first round).

        ``dp_unclipped_fraction`` is the exact fraction of updates left unclipped: a server-side
        diagnostic, not differentially private. ``dp_noisy_unclipped_fraction`` (adaptive only)
        is the private estimate that drove the clip-norm update.
        """
        if self.last_clip_norm is None or self.last_noise_std is None or self.last_unclipped_fraction is None:
            return {}
        out = {
            "dp_clip_norm": self.last_clip_norm,
            "dp_next_clip_norm": self._clip_norm,
            "dp_noise_std": self.last_noise_std,
            "dp_unclipped_fraction": self.last_unclipped_fraction,
        }
        if self.last_noisy_unclipped_fraction is not None:
            out["dp_noisy_unclipped_fraction"] = self.last_noisy_unclipped_fraction
        return out

    # ------------------------------------------------------------------------- lifecycle

    def configure_round(self, server_round: int) -> dict[str, Scalar]:
        return self.inner.configure_round(server_round)

    def begin_round(self, server_round: int, global_weights: Mapping[str, torch.Tensor]) -> ClippedSum:
        return ClippedSum(global_weights, self._clip_norm)

    def _generator(self, server_round: int) -> torch.Generator:
        if self._seed is None:
            seed = secrets.randbits(63)
        else:
            digest = hashlib.sha256(f"leptonfl/central-dp/{self._seed}/{server_round}".encode()).digest()
            seed = int.from_bytes(digest[:8], "big") >> 1
        return torch.Generator(device="cpu").manual_seed(seed)

    def finish_round(
        self, server_round: int, global_weights: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> Weights:
        if not isinstance(aggregate, ClippedSum):
            raise TypeError(f"CentralDP finishes rounds it began (a ClippedSum), got {type(aggregate).__name__}")
        # A round Poisson sampling left empty still releases a (noise-only) update: DP-FedAvg's
        # analysis, and the accountant's step, assume every round does.
        clip = aggregate.clip_norm
        m = self._expected_clients
        sum_std = self._update_noise_multiplier * clip
        generator = self._generator(server_round)

        # Draw order is fixed (count noise, then tensors by name) so a seeded round is reproducible.
        noisy_fraction: float | None = None
        if self._adaptive:
            assert self._clipped_count_stddev is not None
            count_noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self._clipped_count_stddev
            centred = aggregate.num_unclipped - aggregate.num_updates / 2
            noisy_fraction = (centred + count_noise) / m + 0.5

        sums = aggregate._delta_sums  # read only: no model-sized copy
        reference = aggregate.reference()
        floating: Weights = {}
        for name in sorted(sums):
            noise = torch.randn(sums[name].shape, generator=generator, dtype=torch.float64)
            floating[name] = noise.mul_(sum_std).add_(sums[name]).div_(m).add_(reference[name])
        others = (
            aggregate.non_floating_mean()
            if aggregate.num_updates
            else {name: global_weights[name] for name in aggregate.names() if name not in floating}
        )
        mean: Weights = {}
        for name in aggregate.names():
            if name in floating:
                device = global_weights[name].device if name in global_weights else torch.device("cpu")
                mean[name] = floating[name].to(device=device, dtype=aggregate.dtype(name))
            else:
                mean[name] = others[name]
        new_weights = self.inner.server_update(server_round, global_weights, mean)

        if noisy_fraction is not None:
            self._clip_norm = clip * math.exp(-self._clip_lr * (noisy_fraction - self._target_quantile))
        self._rounds += 1
        self.last_clip_norm = clip
        self.last_noise_std = sum_std / m
        self.last_num_clients = aggregate.num_updates
        self.last_unclipped_fraction = aggregate.num_unclipped / max(1, aggregate.num_updates)
        self.last_noisy_unclipped_fraction = noisy_fraction
        return new_weights

    # ----------------------------------------------------------------------- persistence

    def state_dict(self) -> StrategyState:
        """``clip_norm`` (float), ``rounds`` (int), ``inner`` (the inner state's JSON values) and
        ``inner/<key>`` for each tensor the inner state holds at ``<key>``."""
        inner_json: dict[str, object] = {}
        state: StrategyState = {"clip_norm": self._clip_norm, "rounds": self._rounds, INNER: inner_json}
        for key, value in self.inner.state_dict().items():
            if isinstance(value, torch.Tensor):
                state[INNER_PREFIX + key] = value
            else:
                inner_json[key] = value
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        required = {"clip_norm", "rounds", INNER}
        missing = required - set(state)
        unknown = [k for k in state if k not in required and not k.startswith(INNER_PREFIX)]
        if missing or unknown:
            raise ValueError(
                f"central DP state needs keys {sorted(required)} (+ 'inner/…' tensors); "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        clip_raw, rounds, inner_json = state["clip_norm"], state["rounds"], state[INNER]
        clip = _positive("clip_norm in state", clip_raw)
        if not self._adaptive and clip != self._clip_norm:
            raise ValueError(f"state was saved with fixed clip_norm {clip!r}, this strategy uses {self._clip_norm!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds in state must be an integer >= 0, got {rounds!r}")
        if not isinstance(inner_json, Mapping):
            raise ValueError(f"'inner' in state must be a mapping, got {type(inner_json).__name__}")
        inner_state: dict[str, object] = dict(inner_json)
        for key, value in state.items():
            if key.startswith(INNER_PREFIX):
                inner_key = key[len(INNER_PREFIX) :]
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"state key {key!r} must hold a tensor")
                if inner_key in inner_state:
                    raise ValueError(f"inner state key {inner_key!r} appears both as JSON and as a tensor")
                inner_state[inner_key] = value
        self.inner.load_state_dict(inner_state)
        self._clip_norm = clip
        self._rounds = rounds
