"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) and FedProx: exact values
hand-computed from the update rules, parameter validation, and state save/restore.

Notation: w global weights, Δ = mean − w, m first moment / momentum, v second moment,
η server_lr, β momentum / β₁ / β₂, τ adaptivity. Initial m = 0, v = τ².
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

import strategies.fedopt  # noqa: F401  (registers the strategies)
from strategies.base import ClientUpdate, Strategy
from strategies.fedavg import FedAvg
from strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi
from strategies.registry import create_strategy, strategy_names

F64 = torch.float64


def tensor(state: Mapping[str, object], key: str) -> torch.Tensor:
    value = state[key]
    assert isinstance(value, torch.Tensor), key
    return value


def one_round(
    strategy: Strategy, server_round: int, weights: dict[str, torch.Tensor], clients: list[tuple[dict, int]]
) -> dict[str, torch.Tensor]:
    aggregate = strategy.begin_round(server_round, weights)
    for client_weights, n in clients:
        aggregate.add(ClientUpdate(client_weights, n))
    return strategy.finish_round(server_round, weights, aggregate)


def scalar_run(strategy: Strategy, w0: float, means: list[float]) -> list[float]:
    """Rounds with one client whose model is the given mean (a 1-element float64 tensor)."""
    w = {"x": torch.tensor([w0], dtype=F64)}
    out = []
    for r, mean in enumerate(means, start=1):
        w = one_round(strategy, r, w, [({"x": torch.tensor([mean], dtype=F64)}, 5)])
        out.append(w["x"].item())
    return out


# --------------------------------------------------------------------------- registry


def test_registered_names() -> None:
    assert {"fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi"} <= set(strategy_names())
    assert isinstance(create_strategy("fedavgm"), FedAvgM)
    assert isinstance(create_strategy("fedprox"), FedProx)
    assert isinstance(create_strategy("fedadagrad"), FedAdagrad)
    assert isinstance(create_strategy("fedadam"), FedAdam)
    assert isinstance(create_strategy("fedyogi"), FedYogi)


def test_documented_defaults() -> None:
    m = FedAvgM()
    assert (m.server_lr, m.momentum) == (1.0, 0.9)
    assert FedProx().proximal_mu == 0.01
    g = FedAdagrad()
    assert (g.server_lr, g.beta_1, g.tau) == (0.01, 0.9, 1e-3)
    a = FedAdam()
    assert (a.server_lr, a.beta_1, a.beta_2, a.tau, a.bias_correction) == (0.01, 0.9, 0.99, 1e-3, False)
    y = FedYogi()
    assert (y.server_lr, y.beta_1, y.beta_2, y.tau) == (0.01, 0.9, 0.99, 1e-3)


def test_create_strategy_passes_parameters() -> None:
    s = create_strategy("fedadam", {"server_lr": 0.5, "beta_1": 0, "beta_2": 0.5, "tau": 1, "bias_correction": True})
    assert isinstance(s, FedAdam)
    assert (s.server_lr, s.beta_1, s.beta_2, s.tau, s.bias_correction) == (0.5, 0.0, 0.5, 1.0, True)
    with pytest.raises(ValueError, match="not \\['beta_2'\\]"):
        create_strategy("fedadagrad", {"beta_2": 0.9})  # Adagrad has no β₂


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedavgm", {"server_lr": 0.0}, "server_lr must be > 0"),
        ("fedavgm", {"server_lr": -1.0}, "server_lr must be > 0"),
        ("fedavgm", {"server_lr": math.inf}, "server_lr must be finite"),
        ("fedavgm", {"momentum": 1.0}, "0 <= momentum < 1"),
        ("fedavgm", {"momentum": -0.1}, "0 <= momentum < 1"),
        ("fedavgm", {"momentum": "0.9"}, "momentum must be a number"),
        ("fedavgm", {"momentum": True}, "momentum must be a number"),
        ("fedprox", {"proximal_mu": -0.01}, "proximal_mu must be >= 0"),
        ("fedprox", {"proximal_mu": math.nan}, "proximal_mu must be finite"),
        ("fedadagrad", {"tau": 0.0}, "tau must be > 0"),
        ("fedadagrad", {"beta_1": 1.0}, "0 <= beta_1 < 1"),
        ("fedadagrad", {"server_lr": 0}, "server_lr must be > 0"),
        ("fedadam", {"beta_1": 1.5}, "0 <= beta_1 < 1"),
        ("fedadam", {"beta_2": 1.0}, "0 <= beta_2 < 1"),
        ("fedadam", {"beta_2": -0.5}, "0 <= beta_2 < 1"),
        ("fedadam", {"tau": -1e-3}, "tau must be > 0"),
        ("fedadam", {"bias_correction": 1}, "bias_correction must be true or false"),
        ("fedyogi", {"beta_2": 1.0}, "0 <= beta_2 < 1"),
        ("fedyogi", {"tau": math.nan}, "tau must be finite"),
        ("fedyogi", {"server_lr": -0.01}, "server_lr must be > 0"),
    ],
)
def test_invalid_parameters(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_strategy(name, params)


def test_boundary_parameters_accepted() -> None:
    FedAvgM(momentum=0.0)
    FedProx(proximal_mu=0)
    FedAdam(beta_1=0.0, beta_2=0.0)
    FedYogi(beta_1=0, beta_2=0)
    FedAdagrad(beta_1=0)


# --------------------------------------------------------------------------- FedAvgM


def test_fedavgm_exact_three_rounds() -> None:
    # η = 0.5, β = 0.5, w = 1; means 3, 2.5, 2.25 (every value a short binary fraction):
    #   r1: Δ = 3 − 1 = 2,         m = 0.5·0 + 2 = 2,        w = 1 + 0.5·2 = 2
    #   r2: Δ = 2.5 − 2 = 0.5,     m = 0.5·2 + 0.5 = 1.5,    w = 2 + 0.5·1.5 = 2.75
    #   r3: Δ = 2.25 − 2.75 = −0.5, m = 0.5·1.5 − 0.5 = 0.25, w = 2.75 + 0.5·0.25 = 2.875
    s = FedAvgM(server_lr=0.5, momentum=0.5)
    assert scalar_run(s, 1.0, [3.0, 2.5, 2.25]) == [2.0, 2.75, 2.875]
    state = s.state_dict()
    assert set(state) == {"step", "m/x"}
    assert state["step"] == 3
    assert tensor(state, "m/x").tolist() == [0.25]


def test_fedavgm_uses_the_weighted_mean() -> None:
    # Clients (n=1: 0, n=3: 4) → mean 3; then the same numbers as above.
    s = FedAvgM(server_lr=0.5, momentum=0.5)
    w = {"x": torch.tensor([1.0], dtype=F64)}
    w = one_round(s, 1, w, [({"x": torch.tensor([0.0], dtype=F64)}, 1), ({"x": torch.tensor([4.0], dtype=F64)}, 3)])
    assert w["x"].tolist() == [2.0]


def test_fedavgm_without_momentum_is_fedavg() -> None:
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g, dtype=F64)}
    clients = [({k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in w.items()}, n) for n in (3, 9, 1)]
    plain = one_round(FedAvg(), 1, w, clients)
    ours = one_round(FedAvgM(server_lr=1.0, momentum=0.0), 1, w, clients)
    # w + (mean − w) in float64: exact for float32 models, within float64 rounding otherwise.
    assert torch.equal(ours["a"], plain["a"])
    torch.testing.assert_close(ours["b"], plain["b"], rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- FedAdagrad


def test_fedadagrad_exact_three_rounds() -> None:
    # η = 0.5, β₁ = 0.5, τ = 3/8 (v starts at τ² = 9/64). Δs chosen from Pythagorean triples so
    # √v is exact: 9/64 + (4/8)² = (5/8)², (5/8)² + (12/8)² = (13/8)², (13/8)² + (84/8)² = (85/8)².
    #   r1: Δ = 0.5,   m = 0.25,    v = 25/64,   √v + τ = 0.625 + 0.375 = 1,
    #       w = 1 + 0.5·0.25 / 1 = 1.125
    #   r2: Δ = 1.5,   m = 0.5·0.25 + 0.5·1.5 = 0.875,   v = 169/64,  √v + τ = 1.625 + 0.375 = 2,
    #       w = 1.125 + 0.5·0.875 / 2 = 1.34375
    #   r3: Δ = −10.5, m = 0.5·0.875 − 0.5·10.5 = −4.8125, v = 7225/64, √v + τ = 10.625 + 0.375 = 11,
    #       w = 1.34375 − 2.40625 / 11
    s = FedAdagrad(server_lr=0.5, beta_1=0.5, tau=0.375)
    out = scalar_run(s, 1.0, [1.5, 1.125 + 1.5, 1.34375 - 10.5])
    assert out[:2] == [1.125, 1.34375]
    assert out[2] == pytest.approx(1.34375 - 2.40625 / 11, abs=1e-12)
    state = s.state_dict()
    assert tensor(state, "m/x").tolist() == [-4.8125]
    assert tensor(state, "v/x").tolist() == [7225 / 64]


def test_fedadagrad_without_momentum() -> None:
    # β₁ = 0: m = Δ. τ = 0.75, v₀ = 0.5625; Δ = 1: v = 1.5625, √v + τ = 1.25 + 0.75 = 2;
    # η = 1: w = 0 + 1/2.
    assert scalar_run(FedAdagrad(server_lr=1.0, beta_1=0.0, tau=0.75), 0.0, [1.0]) == [0.5]


# --------------------------------------------------------------------------- FedAdam


def test_fedadam_exact_three_rounds() -> None:
    # η = 0.1, β₁ = 0.5, β₂ = 0.75, τ = 0.5 (v₀ = 0.25), w = 1; means 3, then w + 1, then w − 2.
    #   r1: Δ = 2:  m = 1,      v = 0.75·0.25 + 0.25·4 = 1.1875
    #   r2: Δ = 1:  m = 1,      v = 0.75·1.1875 + 0.25·1 = 1.140625
    #   r3: Δ = −2: m = −0.5,   v = 0.75·1.140625 + 0.25·4 = 1.85546875
    s = FedAdam(server_lr=0.1, beta_1=0.5, beta_2=0.75, tau=0.5)
    w1 = 1 + 0.1 * 1 / (math.sqrt(1.1875) + 0.5)
    w2 = w1 + 0.1 * 1 / (math.sqrt(1.140625) + 0.5)
    w3 = w2 + 0.1 * -0.5 / (math.sqrt(1.85546875) + 0.5)
    w = {"x": torch.tensor([1.0], dtype=F64)}
    got = []
    for r, step in enumerate([2.0, 1.0, -2.0], start=1):
        w = one_round(s, r, w, [({"x": w["x"] + step}, 1)])
        got.append(w["x"].item())
    assert got == pytest.approx([w1, w2, w3], abs=1e-12)
    state = s.state_dict()
    assert tensor(state, "m/x").tolist() == pytest.approx([-0.5], abs=1e-15)
    assert tensor(state, "v/x").tolist() == pytest.approx([1.85546875], abs=1e-15)


def test_fedadam_bias_correction() -> None:
    # Same inputs; with bias correction round t's η is scaled by √(1 − β₂ᵗ) / (1 − β₁ᵗ):
    #   t=1: √0.25 / 0.5 = 1,   t=2: √0.4375 / 0.75,   t=3: √0.578125 / 0.875.
    plain = FedAdam(server_lr=0.1, beta_1=0.5, beta_2=0.75, tau=0.5)
    corrected = FedAdam(server_lr=0.1, beta_1=0.5, beta_2=0.75, tau=0.5, bias_correction=True)
    scale = [1.0, math.sqrt(0.4375) / 0.75, math.sqrt(0.578125) / 0.875]
    w_plain = {"x": torch.tensor([1.0], dtype=F64)}
    w_corr = {"x": torch.tensor([1.0], dtype=F64)}
    for r, mean in enumerate([3.0, 2.0, 0.5], start=1):
        client = [({"x": torch.tensor([mean], dtype=F64)}, 1)]
        new_plain = one_round(plain, r, w_plain, client)
        new_corr = one_round(corrected, r, w_corr, client)
        if r == 1:  # the t=1 correction is exactly 1 here
            assert torch.equal(new_plain["x"], new_corr["x"])
        else:  # the moments differ once the weights do, so compare each step with its own moments
            state = corrected.state_dict()
            m, v = tensor(state, "m/x").item(), tensor(state, "v/x").item()
            expected = w_corr["x"].item() + 0.1 * scale[r - 1] * m / (math.sqrt(v) + 0.5)
            assert new_corr["x"].item() == pytest.approx(expected, abs=1e-12)
        w_plain, w_corr = new_plain, new_corr
    assert corrected.state_dict()["step"] == 3


# --------------------------------------------------------------------------- FedYogi


def test_fedyogi_sign_branches_exact() -> None:
    # η = 1, β₁ = 0.5, β₂ = 0.5, τ = 0.5 (v₀ = 0.25). Δ = [1, 0.25, 0.5], Δ² = [1, 0.0625, 0.25]:
    #   sign(v₀ − Δ²) = [−1, +1, 0] → v = 0.25 − 0.5·Δ²·sign = [0.75, 0.21875, 0.25]
    #   m = 0.5·Δ = [0.5, 0.125, 0.25]
    #   w = Δ-start 0 + m / (√v + 0.5): third coordinate 0.25 / (0.5 + 0.5) = 0.25 exactly.
    s = FedYogi(server_lr=1.0, beta_1=0.5, beta_2=0.5, tau=0.5)
    w0 = {"x": torch.zeros(3, dtype=F64)}
    w1 = one_round(s, 1, w0, [({"x": torch.tensor([1.0, 0.25, 0.5], dtype=F64)}, 2)])
    state = s.state_dict()
    assert tensor(state, "v/x").tolist() == [0.75, 0.21875, 0.25]
    assert tensor(state, "m/x").tolist() == [0.5, 0.125, 0.25]
    expected = [0.5 / (math.sqrt(0.75) + 0.5), 0.125 / (math.sqrt(0.21875) + 0.5), 0.25]
    assert w1["x"].tolist() == pytest.approx(expected, abs=1e-12)
    assert w1["x"][2].item() == 0.25

    # r2: Δ = [0, 1, −0.5] (Δ² = [0, 1, 0.25]); sign(v − Δ²) = [+1, −1, 0]:
    #   v = [0.75 − 0, 0.21875 + 0.5, 0.25] = [0.75, 0.71875, 0.25]
    #   m = 0.5·m + 0.5·Δ = [0.25, 0.5625, −0.125]
    w2 = one_round(s, 2, w1, [({"x": w1["x"] + torch.tensor([0.0, 1.0, -0.5], dtype=F64)}, 2)])
    state = s.state_dict()
    assert tensor(state, "v/x").tolist() == pytest.approx([0.75, 0.71875, 0.25], abs=1e-15)
    assert tensor(state, "m/x").tolist() == pytest.approx([0.25, 0.5625, -0.125], abs=1e-15)
    expected2 = [
        expected[0] + 0.25 / (math.sqrt(0.75) + 0.5),
        expected[1] + 0.5625 / (math.sqrt(0.71875) + 0.5),
        0.25 - 0.125,
    ]
    assert w2["x"].tolist() == pytest.approx(expected2, abs=1e-12)


def test_fedyogi_three_rounds() -> None:
    # η = 0.1, β₁ = 0.5, β₂ = 0.75, τ = 0.5 (v₀ = 0.25); Δ = 2, 1, −2 (Δ² = 4, 1, 4):
    #   r1: v₀ < 4: v = 0.25 + 0.25·4 = 1.25;           m = 1
    #   r2: v > 1:  v = 1.25 − 0.25·1 = 1;              m = 0.5 + 0.5 = 1
    #   r3: v < 4:  v = 1 + 0.25·4 = 2;                 m = 0.5 − 1 = −0.5
    s = FedYogi(server_lr=0.1, beta_1=0.5, beta_2=0.75, tau=0.5)
    w1 = 1 + 0.1 * 1 / (math.sqrt(1.25) + 0.5)
    w2 = w1 + 0.1 * 1 / (1 + 0.5)
    w3 = w2 + 0.1 * -0.5 / (math.sqrt(2) + 0.5)
    w = {"x": torch.tensor([1.0], dtype=F64)}
    got = []
    for r, step in enumerate([2.0, 1.0, -2.0], start=1):
        w = one_round(s, r, w, [({"x": w["x"] + step}, 1)])
        got.append(w["x"].item())
    assert got == pytest.approx([w1, w2, w3], abs=1e-12)
    assert tensor(s.state_dict(), "v/x").tolist() == pytest.approx([2.0], abs=1e-15)


# --------------------------------------------------------------------------- dtypes, buffers


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_dtypes_kept_and_integer_buffers_take_the_mean(name: str) -> None:
    s = create_strategy(name, {"server_lr": 0.5})
    w = {
        "w32": torch.tensor([1.0, 2.0], dtype=torch.float32),
        "w64": torch.tensor([1.0], dtype=F64),
        "count": torch.tensor(10, dtype=torch.int64),
    }
    clients = [
        ({"w32": torch.tensor([2.0, 1.0]), "w64": torch.tensor([3.0], dtype=F64), "count": torch.tensor(13)}, 1),
        ({"w32": torch.tensor([4.0, 0.0]), "w64": torch.tensor([0.0], dtype=F64), "count": torch.tensor(15)}, 3),
    ]
    out = one_round(s, 1, w, clients)
    assert {k: t.dtype for k, t in out.items()} == {"w32": torch.float32, "w64": F64, "count": torch.int64}
    assert out["count"].item() == 14  # (13 + 3·15) / 4 = 14.5, rounded half to even like FedAvg
    assert out["count"].item() == one_round(FedAvg(), 1, w, clients)["count"].item()
    state = s.state_dict()
    assert not any(key.endswith("/count") for key in state)
    assert all(t.dtype == F64 for t in state.values() if isinstance(t, torch.Tensor))


def test_update_computed_in_float64_and_rounded_once() -> None:
    # float32 model: the result is the float64 update rounded once to float32.
    w = {"x": torch.tensor([0.1, 0.7, -0.3], dtype=torch.float32)}
    client = {"x": torch.tensor([0.2, 0.6, 0.4], dtype=torch.float32)}
    out = one_round(FedAvgM(server_lr=0.3, momentum=0.9), 1, w, [(client, 1)])
    w64 = w["x"].to(F64)
    expected = (w64 + 0.3 * (client["x"].to(F64) - w64)).to(torch.float32)
    assert torch.equal(out["x"], expected)


# --------------------------------------------------------------------------- state


def random_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(2, 3, 3, generator=g),
        "conv.bias": torch.randn(2, generator=g, dtype=F64),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "scale": torch.randn((), generator=g),
    }


def random_clients(seed: int, template: dict[str, torch.Tensor]) -> list[tuple[dict, int]]:
    g = torch.Generator().manual_seed(1000 + seed)
    clients = []
    for n in (3, 7, 2):
        weights = {
            k: (
                torch.randn(t.shape, generator=g, dtype=t.dtype)
                if t.dtype.is_floating_point
                else torch.randint(0, 100, t.shape, generator=g)
            )
            for k, t in template.items()
        }
        clients.append((weights, n))
    return clients


CONFIGS = [
    ("fedavgm", {}),
    ("fedavgm", {"server_lr": 0.7, "momentum": 0.5}),
    ("fedadagrad", {}),
    ("fedadam", {}),
    ("fedadam", {"bias_correction": True, "server_lr": 0.1}),
    ("fedyogi", {"server_lr": 0.1}),
]


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_resume_from_state_is_bit_identical(name: str, params: dict) -> None:
    w0 = random_model(0)
    rounds = [random_clients(r, w0) for r in range(1, 4)]

    straight = create_strategy(name, params)
    w = w0
    for r, clients in enumerate(rounds, start=1):
        w = one_round(straight, r, w, clients)

    first = create_strategy(name, params)
    resumed_w = one_round(first, 1, w0, rounds[0])
    saved = first.state_dict()
    resumed = create_strategy(name, params)
    resumed.load_state_dict(saved)
    for r, clients in enumerate(rounds[1:], start=2):
        resumed_w = one_round(resumed, r, resumed_w, clients)

    assert resumed_w.keys() == w.keys()
    for key in w:
        assert resumed_w[key].dtype == w[key].dtype
        assert torch.equal(resumed_w[key], w[key]), key
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(tensor(a, key), tensor(b, key)), key
        else:
            assert a[key] == b[key]


@pytest.mark.parametrize(("name", "slots"), [("fedavgm", ["m"]), ("fedadagrad", ["m", "v"]), ("fedyogi", ["m", "v"])])
def test_state_keys(name: str, slots: list[str]) -> None:
    s = create_strategy(name)
    assert s.state_dict() == {"step": 0}
    w0 = random_model(0)
    one_round(s, 1, w0, random_clients(1, w0))
    state = s.state_dict()
    floating = ["conv.weight", "conv.bias", "scale"]
    assert set(state) == {"step"} | {f"{slot}/{n}" for slot in slots for n in floating}
    assert state["step"] == 1
    for slot in slots:
        for n in floating:
            tensor = state[f"{slot}/{n}"]
            assert isinstance(tensor, torch.Tensor) and tensor.shape == w0[n].shape and tensor.dtype == F64


def test_state_dict_is_a_copy() -> None:
    s = FedAvgM()
    w0 = random_model(0)
    one_round(s, 1, w0, random_clients(1, w0))
    state = s.state_dict()
    before = tensor(s.state_dict(), "m/scale").clone()
    tensor(state, "m/scale").add_(100.0)
    assert torch.equal(tensor(s.state_dict(), "m/scale"), before)

    # ... and so is what load_state_dict keeps.
    fresh = FedAvgM()
    snapshot = s.state_dict()
    fresh.load_state_dict(snapshot)
    tensor(snapshot, "m/scale").add_(100.0)
    assert torch.equal(tensor(fresh.state_dict(), "m/scale"), before)


def test_load_empty_state_resets() -> None:
    s = FedYogi()
    w0 = random_model(0)
    first = one_round(s, 1, w0, random_clients(1, w0))
    s.load_state_dict({})
    assert s.state_dict() == {"step": 0}
    again = one_round(s, 1, w0, random_clients(1, w0))
    for key in first:
        assert torch.equal(first[key], again[key])


def test_load_state_dict_rejects_bad_state() -> None:
    s = FedAdam()
    w0 = random_model(0)
    one_round(s, 1, w0, random_clients(1, w0))
    good = s.state_dict()
    target = FedAdam()
    with pytest.raises(ValueError, match="lacks 'step'"):
        target.load_state_dict({k: v for k, v in good.items() if k != "step"})
    with pytest.raises(ValueError, match="non-negative int"):
        target.load_state_dict({**good, "step": -1})
    with pytest.raises(ValueError, match="non-negative int"):
        target.load_state_dict({**good, "step": 1.0})
    with pytest.raises(ValueError, match="unexpected key 'w/scale'"):
        target.load_state_dict({**good, "w/scale": torch.zeros(())})
    with pytest.raises(ValueError, match="unexpected key 'noslash'"):
        target.load_state_dict({**good, "noslash": 1})
    with pytest.raises(ValueError, match="floating-point tensor"):
        target.load_state_dict({**good, "m/scale": [1.0]})
    with pytest.raises(ValueError, match="cover different tensors"):
        target.load_state_dict({k: v for k, v in good.items() if k != "v/scale"})
    with pytest.raises(ValueError, match="differ in shape"):
        target.load_state_dict({**good, "v/scale": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match="step = 0"):
        target.load_state_dict({**good, "step": 0})
    with pytest.raises(ValueError, match="unexpected key 'v/"):
        FedAvgM().load_state_dict(good)  # momentum has no v slot
    assert target.state_dict() == {"step": 0}  # nothing half-loaded


def test_state_for_a_different_model_is_rejected_without_side_effects() -> None:
    s = FedAvgM()
    w0 = random_model(0)
    one_round(s, 1, w0, random_clients(1, w0))
    before = s.state_dict()
    other = {"other": torch.zeros(3)}
    with pytest.raises(ValueError, match="holds optimizer state"):
        one_round(s, 2, other, [({"other": torch.ones(3)}, 1)])
    reshaped = {**w0, "scale": torch.zeros(4)}
    clients = [({**c, "scale": torch.ones(4)}, n) for c, n in random_clients(2, w0)]
    with pytest.raises(ValueError, match="differs in shape"):
        one_round(s, 2, reshaped, clients)
    after = s.state_dict()
    assert after.keys() == before.keys() and after["step"] == 1
    assert all(torch.equal(tensor(after, k), tensor(before, k)) for k in before if k != "step")


# --------------------------------------------------------------------------- FedProx


def test_fedprox_configure_round_sends_mu() -> None:
    assert FedProx().configure_round(1) == {"proximal_mu": 0.01}
    assert create_strategy("fedprox", {"proximal_mu": 0.5}).configure_round(7) == {"proximal_mu": 0.5}
    assert FedProx(proximal_mu=0).configure_round(1) == {"proximal_mu": 0.0}


def test_fedprox_aggregates_like_fedavg_and_keeps_no_state() -> None:
    w0 = random_model(3)
    clients = random_clients(3, w0)
    s = FedProx(proximal_mu=0.1)
    ours = one_round(s, 1, w0, clients)
    plain = one_round(FedAvg(), 1, w0, clients)
    for key in plain:
        assert torch.equal(ours[key], plain[key])
    assert s.state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        s.load_state_dict({"step": 1})
