"""Cross-check the server optimizers against flwr 1.41's strategies of the same name.

Both sides get identical client models (float32) and example counts for several rounds
and must produce the same global weights. flwr computes in float32 (its FedAdam partly
in float64) while we compute in float64 and round once per round, hence TOL = 1e-6 on
values of order 1 (relative beyond 1). Where we deliberately differ from flwr (documented in
`strategies/fedopt.py`), the test either configures ours or flwr to line up and says so,
or asserts the difference itself:

* FedAvgM: opposite sign convention for the momentum buffer; the weights are identical.
* v starts at τ² here, at 0 in flwr: flwr's public `v_t` is seeded with τ² before round 1
  (its update only initialises `v_t` when it is empty), and a separate test shows the
  difference is real at τ = 1e-3 and vanishes (τ² = 1e-18) at τ = 1e-9.
* FedAdagrad: flwr fixes β₁ = 0, so ours runs with `beta_1=0`.
* FedAdam: flwr always bias-corrects with exponent `server_round + 1`; ours with
  `bias_correction=True` uses t = 1, 2, ..., so flwr is driven with server_round = t − 1.
  Another test pins the step-size ratio of the unshifted / uncorrected variants.
* FedProx: both aggregate exactly as FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.server.strategy import FedAdam as FlowerFedAdam
from flwr.server.strategy import FedAvgM as FlowerFedAvgM
from flwr.server.strategy import FedProx as FlowerFedProx
from flwr.server.strategy import FedYogi as FlowerFedYogi

import strategies.fedopt  # noqa: F401  (registers the strategies)
from strategies.base import ClientUpdate, Strategy
from strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi

pytestmark = pytest.mark.flower

SHAPES = {
    "conv.weight": (4, 3, 3, 3),
    "conv.bias": (4,),
    "fc.weight": (10, 12),
    "fc.bias": (10,),
    "scale": (),
}
NUM_CLIENTS = 5
ROUNDS = 4
TOL = 1e-6

Arrays = list[np.ndarray]
Round = tuple[list[Arrays], list[int]]


def scenario(seed: int) -> tuple[Arrays, list[Round]]:
    """Initial weights and, per round, each client's float32 model and example count."""
    rng = np.random.default_rng(seed)
    # np.asarray: arithmetic on 0-d arrays gives numpy scalars, which torch.from_numpy rejects.
    initial = [np.asarray(rng.uniform(-1.0, 1.0, size=s), dtype=np.float32) for s in SHAPES.values()]
    rounds: list[Round] = []
    for _ in range(ROUNDS):
        # A common drift plus client noise keeps Δ = mean − global of order 0.1–1.
        drift = [rng.uniform(-0.5, 0.5, size=s) for s in SHAPES.values()]
        clients = [
            [
                np.asarray(w + d + rng.normal(0.0, 0.3, size=w.shape), dtype=np.float32)
                for w, d in zip(initial, drift, strict=True)
            ]
            for _ in range(NUM_CLIENTS)
        ]
        counts = [int(n) for n in rng.integers(1, 500, size=NUM_CLIENTS)]
        rounds.append((clients, counts))
    return initial, rounds


def run_ours(strategy: Strategy, initial: Arrays, rounds: list[Round]) -> list[Arrays]:
    weights = {name: torch.from_numpy(a.copy()) for name, a in zip(SHAPES, initial, strict=True)}
    history = []
    for r, (clients, counts) in enumerate(rounds, start=1):
        aggregate = strategy.begin_round(r, weights)
        for layers, n in zip(clients, counts, strict=True):
            aggregate.add(ClientUpdate({k: torch.from_numpy(a.copy()) for k, a in zip(SHAPES, layers, strict=True)}, n))
        weights = strategy.finish_round(r, weights, aggregate)
        assert all(t.dtype == torch.float32 for t in weights.values())
        history.append([t.numpy().copy() for t in weights.values()])
    return history


def fit_results(clients: list[Arrays], counts: list[int]) -> list[tuple[None, FitRes]]:
    # aggregate_fit never touches the ClientProxy, so None stands in for it.
    return [
        (
            None,
            FitRes(
                status=Status(code=Code.OK, message="ok"),
                parameters=ndarrays_to_parameters([a.copy() for a in layers]),
                num_examples=n,
                metrics={},
            ),
        )
        for layers, n in zip(clients, counts, strict=True)
    ]


def run_flower(strategy, rounds: list[Round], round_number: Callable[[int], int] = lambda r: r) -> list[Arrays]:
    history = []
    for r, (clients, counts) in enumerate(rounds, start=1):
        params, _ = strategy.aggregate_fit(round_number(r), fit_results(clients, counts), [])
        assert params is not None
        history.append(parameters_to_ndarrays(params))
    return history


def max_diff(a: list[Arrays], b: list[Arrays]) -> float:
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra, rb, strict=True)
    )


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """|got − want| ≤ TOL·(1 + |want|): a few float32 ulps for weights that grow past 1."""
    assert got.shape == want.shape, what
    excess = np.abs(got.astype(np.float64) - want.astype(np.float64)) - TOL * (1 + np.abs(want.astype(np.float64)))
    assert np.all(excess <= 0), f"{what}: max excess over tolerance {float(np.max(excess))}"


def assert_history_close(ours: list[Arrays], theirs: list[Arrays], initial: Arrays) -> None:
    assert len(ours) == len(theirs) == ROUNDS
    for r, (got, want) in enumerate(zip(ours, theirs, strict=True), start=1):
        for name, g, w in zip(SHAPES, got, want, strict=True):
            assert_close(g, w, f"round {r} {name}")
    # Guard against a vacuous comparison: the optimizer really moved the weights.
    assert max_diff([initial], [ours[-1]]) > 1000 * TOL


def seed_flower_v(strategy, initial: Arrays, tau: float) -> None:
    """Start flwr's second moment at τ², as ours does (flwr only fills an empty `v_t`)."""
    strategy.v_t = [np.full_like(a, tau**2) for a in initial]


# --------------------------------------------------------------------------- FedAvgM


@pytest.mark.parametrize(("server_lr", "momentum"), [(1.0, 0.9), (0.7, 0.5), (1.3, 0.0), (1.0, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fedavgm_matches_flower(seed: int, server_lr: float, momentum: float) -> None:
    initial, rounds = scenario(seed)
    ours_strategy = FedAvgM(server_lr=server_lr, momentum=momentum)
    theirs_strategy = FlowerFedAvgM(
        initial_parameters=ndarrays_to_parameters(initial), server_learning_rate=server_lr, server_momentum=momentum
    )
    ours = run_ours(ours_strategy, initial, rounds)
    assert_history_close(ours, run_flower(theirs_strategy, rounds), initial)
    if momentum > 0:
        # Documented sign convention: flwr keeps the momentum of global − mean, we of mean − global.
        state = ours_strategy.state_dict()
        assert theirs_strategy.momentum_vector is not None
        for name, theirs_m in zip(SHAPES, theirs_strategy.momentum_vector, strict=True):
            ours_m = state[f"m/{name}"]
            assert isinstance(ours_m, torch.Tensor)
            assert_close(ours_m.numpy(), -theirs_m, f"momentum {name}")


# --------------------------------------------------------------------------- FedAdagrad


@pytest.mark.parametrize(("eta", "tau"), [(0.1, 1e-3), (0.3, 1e-2), (0.1, 1e-9)])
@pytest.mark.parametrize("seed", [0, 2])
def test_fedadagrad_matches_flower(seed: int, eta: float, tau: float) -> None:
    initial, rounds = scenario(seed)
    theirs_strategy = FlowerFedAdagrad(initial_parameters=ndarrays_to_parameters(initial), eta=eta, tau=tau)
    seed_flower_v(theirs_strategy, initial, tau)
    # flwr's FedAdagrad has no first-moment averaging: β₁ = 0.
    ours = run_ours(FedAdagrad(server_lr=eta, beta_1=0.0, tau=tau), initial, rounds)
    assert_history_close(ours, run_flower(theirs_strategy, rounds), initial)


# --------------------------------------------------------------------------- FedAdam


@pytest.mark.parametrize(("eta", "beta_1", "beta_2", "tau"), [(0.1, 0.9, 0.99, 1e-3), (0.05, 0.5, 0.9, 1e-2)])
@pytest.mark.parametrize("seed", [0, 3])
def test_fedadam_matches_flower_with_bias_correction(
    seed: int, eta: float, beta_1: float, beta_2: float, tau: float
) -> None:
    initial, rounds = scenario(seed)
    theirs_strategy = FlowerFedAdam(
        initial_parameters=ndarrays_to_parameters(initial), eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau
    )
    seed_flower_v(theirs_strategy, initial, tau)
    ours = run_ours(
        FedAdam(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, bias_correction=True), initial, rounds
    )
    # flwr's correction exponent is server_round + 1, ours is the step t: round r ↔ t = r + 1.
    assert_history_close(ours, run_flower(theirs_strategy, rounds, round_number=lambda t: t - 1), initial)


def test_fedadam_documented_step_size_differences() -> None:
    # Round 1 starts both sides from the same m = 0, v = τ², so the moments agree and the
    # steps w₁ − w₀ differ only by the step size. flwr's round-1 step size is
    # η √(1 − β₂²) / (1 − β₁²); ours is η (paper, no correction) or, with
    # bias_correction=True, η √(1 − β₂) / (1 − β₁) (Kingma & Ba, t = 1).
    # (With the defaults β₁ = 0.9, β₂ = 0.99 the t = 1 correction happens to be exactly 1.)
    eta, beta_1, beta_2, tau = 0.1, 0.5, 0.9, 1e-3
    initial, rounds = scenario(4)
    theirs_strategy = FlowerFedAdam(
        initial_parameters=ndarrays_to_parameters(initial), eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau
    )
    seed_flower_v(theirs_strategy, initial, tau)
    theirs = run_flower(theirs_strategy, rounds[:1])[0]
    paper = run_ours(FedAdam(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=tau), initial, rounds[:1])[0]
    corrected = run_ours(
        FedAdam(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, bias_correction=True), initial, rounds[:1]
    )[0]

    flower_scale = math.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    kingma_scale = math.sqrt(1 - beta_2) / (1 - beta_1)
    for w0, t, p, c in zip(initial, theirs, paper, corrected, strict=True):
        w0 = w0.astype(np.float64)
        step_theirs, step_paper, step_corr = t - w0, p.astype(np.float64) - w0, c.astype(np.float64) - w0
        big = np.abs(step_paper) > 1e-3  # float32 rounding dominates tiny steps
        assert big.any()
        np.testing.assert_allclose(step_theirs[big] / step_paper[big], flower_scale, rtol=1e-4)
        np.testing.assert_allclose(step_corr[big] / step_paper[big], kingma_scale, rtol=1e-4)
    # The three step sizes really differ: ≈ 0.581 η (flwr), 0.632 η (ours corrected), η (ours).
    assert abs(flower_scale - 1) > 0.1 and abs(kingma_scale - 1) > 0.1 and abs(flower_scale - kingma_scale) > 0.02


# --------------------------------------------------------------------------- FedYogi


@pytest.mark.parametrize(("eta", "beta_1", "beta_2", "tau"), [(0.1, 0.9, 0.99, 1e-3), (0.05, 0.5, 0.75, 1e-2)])
@pytest.mark.parametrize("seed", [0, 5])
def test_fedyogi_matches_flower(seed: int, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
    initial, rounds = scenario(seed)
    theirs_strategy = FlowerFedYogi(
        initial_parameters=ndarrays_to_parameters(initial), eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau
    )
    seed_flower_v(theirs_strategy, initial, tau)
    ours = run_ours(FedYogi(server_lr=eta, beta_1=beta_1, beta_2=beta_2, tau=tau), initial, rounds)
    assert_history_close(ours, run_flower(theirs_strategy, rounds), initial)


# --------------------------------------------------------------------------- v₋₁ = τ² vs 0


@pytest.mark.parametrize("name", ["fedadagrad", "fedyogi"])
def test_initial_second_moment_difference(name: str) -> None:
    # Unseeded flwr starts v at 0. At τ = 1e-9 that is indistinguishable from our τ² = 1e-18;
    # at τ = 1e-3 (τ² = 1e-6, comparable to (1 − β₂) Δ² for small Δ) the results differ.
    initial, rounds = scenario(6)

    def pair(tau: float) -> tuple[list[Arrays], list[Arrays]]:
        parameters = ndarrays_to_parameters(initial)
        if name == "fedadagrad":
            ours = run_ours(FedAdagrad(server_lr=0.1, beta_1=0.0, tau=tau), initial, rounds)
            return ours, run_flower(FlowerFedAdagrad(initial_parameters=parameters, eta=0.1, tau=tau), rounds)
        ours = run_ours(FedYogi(server_lr=0.1, tau=tau), initial, rounds)
        return ours, run_flower(FlowerFedYogi(initial_parameters=parameters, eta=0.1, tau=tau), rounds)

    assert_history_close(*pair(1e-9), initial)
    ours, theirs = pair(1e-3)
    assert max_diff(ours, theirs) > 100 * TOL


# --------------------------------------------------------------------------- FedProx


@pytest.mark.parametrize("seed", [0, 7])
def test_fedprox_matches_flower(seed: int) -> None:
    initial, rounds = scenario(seed)
    ours_strategy = FedProx(proximal_mu=0.1)
    theirs_strategy = FlowerFedProx(proximal_mu=0.1, initial_parameters=ndarrays_to_parameters(initial))
    ours = run_ours(ours_strategy, initial, rounds)
    theirs = run_flower(theirs_strategy, rounds)
    for r, (got, want) in enumerate(zip(ours, theirs, strict=True), start=1):
        for name, g, w in zip(SHAPES, got, want, strict=True):
            assert_close(g, w, f"round {r} {name}")
    # Both send the same client config key and value.
    assert ours_strategy.configure_round(1) == {"proximal_mu": theirs_strategy.proximal_mu}
