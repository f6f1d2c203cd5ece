"""Central DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import pytest
import torch
from scipy import stats

from strategies.base import ClientUpdate, RoundAggregate, StrategyState, Weights
from strategies.dp import CentralDP, ClippedSum
from strategies.fedavg import FedAvg, MeanBasedStrategy

F64 = torch.float64


def fold(aggregate: RoundAggregate, updates: Sequence[Mapping[str, torch.Tensor]], examples: int = 1) -> None:
    for weights in updates:
        aggregate.add(ClientUpdate(weights, examples))


def run_round(strategy: CentralDP, r: int, global_weights: Weights, updates: list[Weights]) -> Weights:
    aggregate = strategy.begin_round(r, global_weights)
    fold(aggregate, updates)
    return strategy.finish_round(r, global_weights, aggregate)


# --------------------------------------------------------------------------- clipping, exactly


def test_clipped_sum_exact() -> None:
    g = {"w": torch.tensor([1.0, 1.0], dtype=F64)}
    agg = ClippedSum(g, clip_norm=1.0)
    fold(
        agg,
        [
            {"w": torch.tensor([4.0, 5.0], dtype=F64)},  # Δ = (3, 4), ‖Δ‖ = 5 > 1 → (0.6, 0.8)
            {"w": torch.tensor([1.5, 1.0], dtype=F64)},  # Δ = (0.5, 0), ‖Δ‖ = 0.5 ≤ 1 → unchanged
            {"w": torch.tensor([1.0, 0.0], dtype=F64)},  # Δ = (0, −1), ‖Δ‖ = 1 = C → unclipped (b = 1)
        ],
        examples=7,  # unweighted: example counts must not matter
    )
    assert agg.clipped_sum()["w"].tolist() == [0.6 + 0.5, 0.8 - 1.0]
    assert agg.num_updates == 3 and agg.num_unclipped == 2 and agg.num_examples == 21


def test_clipping_uses_the_norm_across_all_tensors() -> None:
    g = {"a": torch.zeros(1, dtype=F64), "b": torch.zeros(1, dtype=F64), "step": torch.tensor(0)}
    agg = ClippedSum(g, clip_norm=2.5)
    # Δ_a = 3, Δ_b = 4: one vector of norm 5 > C = 2.5, so both scale by ½ (not clipped per tensor).
    fold(agg, [{"a": torch.tensor([3.0], dtype=F64), "b": torch.tensor([4.0], dtype=F64), "step": torch.tensor(5)}])
    total = agg.clipped_sum()
    assert total["a"].item() == 1.5 and total["b"].item() == 2.0
    assert "step" not in total and agg.num_unclipped == 0


def test_float32_model_deltas_are_exact() -> None:
    g = {"w": torch.tensor([0.1, 1e8], dtype=torch.float32)}
    w = {"w": torch.tensor([0.2, 1e8 + 8], dtype=torch.float32)}
    agg = ClippedSum(g, clip_norm=100.0)
    fold(agg, [w])
    expected = w["w"].to(F64) - g["w"].to(F64)
    assert torch.equal(agg.clipped_sum()["w"], expected)


def test_bad_updates_leave_the_sum_untouched() -> None:
    g = {"w": torch.zeros(2, dtype=F64)}
    agg = ClippedSum(g, clip_norm=1.0)
    fold(agg, [{"w": torch.tensor([0.5, 0.0], dtype=F64)}])
    for bad, match in [
        ({"w": torch.tensor([math.nan, 0.0], dtype=F64)}, "not finite"),
        ({"w": torch.tensor([math.inf, 0.0], dtype=F64)}, "not finite"),
        ({"w": torch.zeros(3, dtype=F64)}, "shape"),
        ({"v": torch.zeros(2, dtype=F64)}, "differ"),
    ]:
        with pytest.raises(ValueError, match=match):
            agg.add(ClientUpdate(bad, 1))
    assert agg.clipped_sum()["w"].tolist() == [0.5, 0.0] and agg.num_updates == 1
    with pytest.raises(RuntimeError, match="un-noised"):
        agg.result()


# --------------------------------------------------------------------------- noise


def test_noise_has_the_documented_std() -> None:
    """All clients send the global model (Δ = 0), so result − global is pure noise:
    N(0, (z·C/m)²) per coordinate = N(0, 0.5²) for z = 1, C = 2, m = 4.

    n = 10,000 samples. Bounds at a two-sided 1e-6 level each (deterministic with the seed):
    * mean: x̄ ~ N(0, σ²/n), |x̄| ≤ 4.89·σ/√n = 0.0245;
    * variance: (n−1)s²/σ² ~ χ²(n−1), s ∈ σ·[√(χ²_lo/(n−1)), √(χ²_hi/(n−1))] ≈ 0.5·[0.9662, 1.0345];
    * shape: Kolmogorov–Smirnov against N(0, 0.5²), p > 1e-6.
    """
    n, sigma = 10_000, 0.5
    g = {"w": torch.linspace(-1, 1, n, dtype=F64)}
    strategy = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=2.0, expected_clients=4, seed=1234)
    new = run_round(strategy, 1, g, [dict(g) for _ in range(4)])
    noise = new["w"] - g["w"]
    assert strategy.last_noise_std == sigma
    assert strategy.last_unclipped_fraction == 1.0

    mean, std = noise.mean().item(), noise.std().item()
    p = 1e-6
    mean_bound = stats.norm.ppf(1 - p / 2) * sigma / math.sqrt(n)
    lo = sigma * math.sqrt(stats.chi2.ppf(p / 2, n - 1) / (n - 1))
    hi = sigma * math.sqrt(stats.chi2.ppf(1 - p / 2, n - 1) / (n - 1))
    assert abs(mean) <= mean_bound, (mean, mean_bound)
    assert lo <= std <= hi, (std, lo, hi)
    assert stats.kstest(noise.numpy() / sigma, "norm").pvalue > p


def test_noise_is_divided_by_expected_clients_not_arrivals() -> None:
    # Two clients arrive but m = 4: the same seed gives the same noise draw, and the result
    # is global + (Σ clipped Δ + noise) / 4.
    g = {"w": torch.zeros(3, dtype=F64)}
    updates = [{"w": torch.tensor([3.0, 4.0, 0.0], dtype=F64)}, {"w": torch.tensor([0.0, 0.0, 0.5], dtype=F64)}]
    quiet = CentralDP(FedAvg(), noise_multiplier=1e-12, clip_norm=1.0, expected_clients=4, seed=0)
    new = run_round(quiet, 1, g, updates)
    assert torch.allclose(new["w"], torch.tensor([0.6, 0.8, 0.5], dtype=F64) / 4, rtol=0, atol=1e-12)
    assert quiet.last_unclipped_fraction == 0.5 and quiet.last_num_clients == 2


def test_seeded_noise_is_reproducible_per_round() -> None:
    g = {"w": torch.zeros(100, dtype=F64)}

    def noise(seed: int | None, r: int) -> torch.Tensor:
        strategy = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2, seed=seed)
        return run_round(strategy, r, g, [dict(g)])["w"]

    assert torch.equal(noise(7, 1), noise(7, 1))
    assert not torch.equal(noise(7, 1), noise(7, 2))
    assert not torch.equal(noise(7, 1), noise(8, 1))


def test_unseeded_noise_differs_between_rounds() -> None:
    g = {"w": torch.zeros(100, dtype=F64)}
    strategy = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2)
    first = run_round(strategy, 1, g, [dict(g)])["w"]
    second = run_round(strategy, 2, g, [dict(g)])["w"]
    again = run_round(CentralDP(FedAvg(), 1.0, 1.0, 2), 1, g, [dict(g)])["w"]
    assert not torch.equal(first, second) and not torch.equal(first, again)
    assert first.std().item() > 0.1  # noise present: std 0.5 expected


def test_dtypes_and_non_floating_tensors() -> None:
    g = {"w": torch.zeros(4, dtype=torch.float32), "count": torch.tensor([10, 0])}
    updates = [
        ClientUpdate({"w": torch.ones(4), "count": torch.tensor([12, 1])}, 1),
        ClientUpdate({"w": torch.ones(4), "count": torch.tensor([20, 4])}, 3),
    ]
    strategy = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=0.5, expected_clients=2, seed=3)
    aggregate = strategy.begin_round(1, g)
    for u in updates:
        aggregate.add(u)
    new = strategy.finish_round(1, g, aggregate)
    assert new["w"].dtype == torch.float32 and new["count"].dtype == torch.int64
    # Not privatised: FedAvg's example-weighted mean, rounded: (12·1 + 20·3)/4 = 18, (1 + 12)/4 = 3.25 → 3.
    assert new["count"].tolist() == [18, 3]
    assert new.keys() == g.keys()


# --------------------------------------------------------------------------- composition


class DoubleStep(MeanBasedStrategy):
    """A server update that doubles the step: w ← w + 2 (mean − w). Keeps a JSON counter and a tensor."""

    name = "double_step"

    def __init__(self) -> None:
        self.calls = 0
        self.last_step: torch.Tensor | None = None

    def server_update(self, server_round: int, global_weights: Mapping[str, torch.Tensor], mean: Weights) -> Weights:
        self.calls += 1
        out = {k: global_weights[k] + 2 * (mean[k] - global_weights[k]) for k in mean}
        # A momentum-like buffer, so the state carries a tensor too.
        step = mean["w"] - global_weights["w"]
        self.last_step = step if self.last_step is None else 0.5 * self.last_step + step
        return out

    def state_dict(self) -> StrategyState:
        state: StrategyState = {"calls": self.calls}
        if self.last_step is not None:
            state["last_step"] = self.last_step.clone()
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        calls = state["calls"]
        assert isinstance(calls, int)
        self.calls = calls
        last = state.get("last_step")
        self.last_step = last.clone() if isinstance(last, torch.Tensor) else None


def test_inner_server_update_is_applied_to_the_noisy_mean() -> None:
    g = {"w": torch.tensor([1.0, -1.0, 0.0], dtype=F64)}
    updates = [{"w": g["w"] + torch.tensor([3.0, 4.0, 0.0], dtype=F64)}, {"w": g["w"] + torch.tensor([0, 0, 0.2])}]
    fedavg = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2, seed=11)
    inner = DoubleStep()
    doubled = CentralDP(inner, noise_multiplier=1.0, clip_norm=1.0, expected_clients=2, seed=11)
    plain = run_round(fedavg, 5, g, updates)
    twice = run_round(doubled, 5, g, updates)
    assert inner.calls == 1
    assert torch.allclose(twice["w"] - g["w"], 2 * (plain["w"] - g["w"]), rtol=0, atol=1e-12)
    # And without noise to speak of, exactly the doubled clipped mean: 2·((0.6, 0.8, 0) + (0, 0, 0.2))/2.
    quiet = CentralDP(DoubleStep(), noise_multiplier=1e-12, clip_norm=1.0, expected_clients=2, seed=11)
    assert torch.allclose(run_round(quiet, 1, g, updates)["w"], g["w"] + torch.tensor([0.6, 0.8, 0.2], dtype=F64))


def test_configure_round_is_the_inner_strategys() -> None:
    class WithConfig(FedAvg):
        def configure_round(self, server_round: int) -> dict[str, bool | int | float | str]:
            return {"proximal_mu": 0.01 * server_round}

    assert CentralDP(WithConfig(), 1.0, 1.0, 10).configure_round(3) == {"proximal_mu": 0.03}


# --------------------------------------------------------------------------- adaptive clipping


def test_update_noise_multiplier_formula() -> None:
    # z = 0.5, m = 10 → σ_b = m/20 = 0.5, 2σ_b = 1: z_Δ = (0.5⁻² − 1⁻²)^(−½) = 3^(−½).
    strategy = CentralDP(FedAvg(), 0.5, None, 10, adaptive=True)
    assert strategy.clipped_count_stddev == 0.5
    assert strategy.update_noise_multiplier == (0.5**-2 - (2 * 0.5) ** -2) ** -0.5
    assert strategy.update_noise_multiplier == pytest.approx(1 / math.sqrt(3), rel=1e-15)
    assert strategy.noise_multiplier == 0.5
    # The two Gaussian queries compose back to z: z_Δ⁻² + (2σ_b)⁻² = z⁻².
    assert strategy.update_noise_multiplier**-2 + 1.0 == pytest.approx(0.5**-2, rel=1e-15)
    explicit = CentralDP(FedAvg(), 1.0, None, 10, adaptive=True, clipped_count_stddev=2.0)
    assert explicit.update_noise_multiplier == (1.0 - 1 / 16) ** -0.5
    assert CentralDP(FedAvg(), 1.0, 2.0, 10).update_noise_multiplier == 1.0  # fixed: z_Δ = z


def test_adaptive_needs_enough_count_noise() -> None:
    with pytest.raises(ValueError, match=r"z < 2·σ_b"):
        CentralDP(FedAvg(), 1.0, None, 4, adaptive=True)  # σ_b = 0.2: 2σ_b = 0.4 ≤ z
    with pytest.raises(ValueError, match="exists only if"):
        CentralDP(FedAvg(), 1.0, None, 100, adaptive=True, clipped_count_stddev=0.5)  # 2σ_b = z exactly


def updates_of_norm(g: Weights, norm: float, count: int) -> list[Weights]:
    direction = torch.ones_like(g["w"]) / math.sqrt(g["w"].numel())
    return [{"w": g["w"] + norm * direction} for _ in range(count)]


@pytest.mark.parametrize(("update_norm", "grows"), [(1e3, True), (1e-6, False)])
def test_adaptive_clip_norm_moves_towards_the_quantile(update_norm: float, grows: bool) -> None:
    m = 10
    strategy = CentralDP(FedAvg(), 0.5, None, m, adaptive=True, initial_clip_norm=0.1, seed=5)
    g = {"w": torch.zeros(8, dtype=F64)}
    norms = [strategy.clip_norm]
    for r in range(1, 6):
        g = run_round(strategy, r, g, updates_of_norm(g, update_norm, m))
        norms.append(strategy.clip_norm)
        assert strategy.last_unclipped_fraction == (0.0 if grows else 1.0)
        noisy = strategy.last_noisy_unclipped_fraction
        assert noisy is not None
        # C ← C·exp(−η(b̄ − γ)) exactly, with b̄ the noisy estimate.
        assert norms[-1] == norms[-2] * math.exp(-0.2 * (noisy - 0.5))
    steps = [b / a for a, b in zip(norms, norms[1:], strict=False)]
    if grows:
        assert all(s > 1 for s in steps), norms
        assert all(s == pytest.approx(math.exp(0.1), abs=0.04) for s in steps)  # b̄ ≈ 0: factor e^{0.2·0.5}
    else:
        assert all(s < 1 for s in steps), norms
        assert all(s == pytest.approx(math.exp(-0.1), abs=0.04) for s in steps)  # b̄ ≈ 1
    diag = strategy.diagnostics()
    assert diag["dp_next_clip_norm"] == strategy.clip_norm and diag["dp_clip_norm"] == norms[-2]
    assert diag["dp_noise_std"] == strategy.update_noise_multiplier * norms[-2] / m


def test_fixed_clip_norm_stays() -> None:
    strategy = CentralDP(FedAvg(), 1.0, 0.3, 4, seed=1)
    g = {"w": torch.zeros(4, dtype=F64)}
    run_round(strategy, 1, g, updates_of_norm(g, 10.0, 4))
    assert strategy.clip_norm == 0.3 and strategy.last_noisy_unclipped_fraction is None
    assert "dp_noisy_unclipped_fraction" not in strategy.diagnostics()


# --------------------------------------------------------------------------- state


def split_state(state: StrategyState) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """What the server does: tensors to the checkpoint file, the rest through JSON to the database."""
    tensors = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = json.loads(json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}))
    return plain, tensors


def test_state_round_trip_resumes_identically() -> None:
    m, rounds, cut = 6, 6, 3

    def make() -> CentralDP:
        return CentralDP(DoubleStep(), 0.5, None, m, adaptive=True, initial_clip_norm=0.5, seed=99)

    def client_updates(r: int, g: Weights) -> list[Weights]:
        gen = torch.Generator().manual_seed(r)
        return [{"w": g["w"] + torch.randn(5, generator=gen, dtype=F64) * (0.2 + k)} for k in range(m - 1)]

    g0 = {"w": torch.zeros(5, dtype=F64)}
    straight = make()
    g = g0
    for r in range(1, rounds + 1):
        g = run_round(straight, r, g, client_updates(r, g))
    final_straight, clip_straight = g, straight.clip_norm

    first = make()
    g = g0
    for r in range(1, cut + 1):
        g = run_round(first, r, g, client_updates(r, g))
    state = first.state_dict()
    assert set(state) == {"clip_norm", "rounds", "inner", "inner/last_step"}
    assert state["rounds"] == cut and state["inner"] == {"calls": cut}
    assert isinstance(state["clip_norm"], float) and state["clip_norm"] != 0.5
    plain, tensors = split_state(state)

    resumed = make()
    resumed.load_state_dict({**plain, **tensors})
    assert resumed.clip_norm == first.clip_norm and resumed.rounds == cut
    assert resumed.state_dict()["inner"] == {"calls": cut}
    for r in range(cut + 1, rounds + 1):
        g = run_round(resumed, r, g, client_updates(r, g))
    assert torch.equal(g["w"], final_straight["w"])
    assert resumed.clip_norm == clip_straight
    assert resumed.rounds == straight.rounds == rounds
    assert isinstance(resumed.inner, DoubleStep) and isinstance(straight.inner, DoubleStep)
    assert resumed.inner.last_step is not None and straight.inner.last_step is not None
    assert torch.equal(resumed.inner.last_step, straight.inner.last_step)


def test_fresh_state_with_stateless_inner() -> None:
    strategy = CentralDP(FedAvg(), 1.0, 2.0, 5)
    assert strategy.state_dict() == {"clip_norm": 2.0, "rounds": 0, "inner": {}}
    assert strategy.diagnostics() == {}
    strategy.load_state_dict({"clip_norm": 2.0, "rounds": 4, "inner": {}})
    assert strategy.rounds == 4


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"clip_norm": 2.0, "rounds": 0}, "missing"),
        ({"clip_norm": 2.0, "rounds": 0, "inner": {}, "momentum": 1}, "unknown"),
        ({"clip_norm": 3.0, "rounds": 0, "inner": {}}, "fixed clip_norm"),
        ({"clip_norm": -1.0, "rounds": 0, "inner": {}}, "clip_norm"),
        ({"clip_norm": 2.0, "rounds": -1, "inner": {}}, "rounds"),
        ({"clip_norm": 2.0, "rounds": 0, "inner": []}, "mapping"),
        ({"clip_norm": 2.0, "rounds": 0, "inner": {}, "inner/x": 1.0}, "tensor"),
        ({"clip_norm": 2.0, "rounds": 0, "inner": {"x": 1}}, "keeps no state"),
    ],
)
def test_load_rejects_bad_state(state: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CentralDP(FedAvg(), 1.0, 2.0, 5).load_state_dict(state)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -2.0}, "clip_norm"),
        ({"clip_norm": None}, "needs clip_norm"),
        ({"expected_clients": 0}, "expected_clients"),
        ({"expected_clients": -3.0}, "expected_clients"),
        ({"target_quantile": 0.0}, "target_quantile"),
        ({"target_quantile": 1.0}, "target_quantile"),
        ({"clip_lr": 0.0}, "clip_lr"),
        ({"seed": 1.5}, "seed"),
        ({"clipped_count_stddev": 1.0}, "only applies with adaptive"),
        ({"adaptive": True}, "initial_clip_norm, not clip_norm"),
        ({"adaptive": True, "clip_norm": None, "initial_clip_norm": 0.0}, "initial_clip_norm"),
        ({"adaptive": True, "clip_norm": None, "clipped_count_stddev": -1.0}, "clipped_count_stddev"),
    ],
)
def test_rejects_bad_parameters(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"noise_multiplier": 0.1, "clip_norm": 1.0, "expected_clients": 20, **kwargs}
    with pytest.raises(ValueError, match=match):
        CentralDP(FedAvg(), **args)  # type: ignore[arg-type]


def test_rejects_non_mean_based_inner_and_foreign_aggregates() -> None:
    with pytest.raises(TypeError, match="mean-based"):
        CentralDP(object(), 1.0, 1.0, 2)  # type: ignore[arg-type]
    strategy = CentralDP(FedAvg(), 1.0, 1.0, 2)
    g = {"w": torch.zeros(2, dtype=F64)}
    foreign = FedAvg().begin_round(1, g)
    foreign.add(ClientUpdate(g, 1))
    with pytest.raises(TypeError, match="ClippedSum"):
        strategy.finish_round(1, g, foreign)
    assert strategy.rounds == 0  # a refused round changes nothing (an empty one is noise only: see below)


def test_an_empty_round_releases_noise_only() -> None:
    """Poisson sampling may select nobody: the round still commits global + N(0, (zC)^2)/K."""
    from strategies.dp import CentralDP
    from strategies.fedavg import FedAvg

    weights = {"w": torch.zeros(20_000)}
    dp = CentralDP(FedAvg(), noise_multiplier=1.0, clip_norm=2.0, expected_clients=4, seed=7)
    aggregate = dp.begin_round(1, weights)
    new = dp.finish_round(1, weights, aggregate)["w"]
    assert new.dtype == torch.float32 and not torch.equal(new, weights["w"])
    assert abs(float(new.std()) - 0.5) < 0.02  # z*C/K = 1*2/4
    assert dp.last_num_clients == 0 and dp.rounds == 1
