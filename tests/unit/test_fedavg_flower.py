"""Cross-check our FedAvg against Flower's on identical random inputs.

Flower's FedAvg works in the clients' dtype (float32 here): it scales and sums float32
arrays. Ours accumulates Σ n_k w_k in float64 and rounds once to float32 at the end, so
the two agree to a few float32 ulps, not bit for bit; hence the 1e-6 tolerance on values
of order 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.server.strategy.aggregate import aggregate as flower_aggregate

from strategies import ClientUpdate, FedAvg

pytestmark = pytest.mark.flower

SHAPES = {
    "conv.weight": (4, 3, 3, 3),
    "conv.bias": (4,),
    "fc.weight": (10, 36),
    "fc.bias": (10,),
    "scale": (),
}
NUM_CLIENTS = 7
TOL = 1e-6


def client_data(seed: int) -> tuple[list[list[np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    counts = [int(n) for n in rng.integers(1, 600, size=NUM_CLIENTS)]
    assert len(set(counts)) > 1  # the weighting must matter
    arrays = [
        [rng.uniform(-2.0, 2.0, size=shape).astype(np.float32) for shape in SHAPES.values()] for _ in range(NUM_CLIENTS)
    ]
    return arrays, counts


def ours(arrays: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    template = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in SHAPES.items()}
    agg = FedAvg().begin_round(1, template)
    for layers, n in zip(arrays, counts, strict=True):
        weights = {name: torch.from_numpy(a.copy()) for name, a in zip(SHAPES, layers, strict=True)}
        agg.add(ClientUpdate(weights, n))
    out = agg.result()
    assert list(out) == list(SHAPES)
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == SHAPES[name]
    return [t.numpy() for t in out.values()]


def exact(arrays: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    total = sum(counts)
    return [
        np.sum(
            [layers[i].astype(np.float64) * n for layers, n in zip(arrays, counts, strict=True)],
            axis=0,
        )
        / total
        for i in range(len(SHAPES))
    ]


def assert_close(got: list[np.ndarray], want: list[np.ndarray], tol: float) -> None:
    assert len(got) == len(want)
    for name, g, w in zip(SHAPES, got, want, strict=True):
        assert g.shape == w.shape, name
        diff = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
        assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"


def fit_results(arrays: list[list[np.ndarray]], counts: list[int]) -> list[tuple[None, FitRes]]:
    # FedAvg.aggregate_fit never touches the ClientProxy, so None stands in for it.
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
        for layers, n in zip(arrays, counts, strict=True)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_flower_aggregate_function(seed: int) -> None:
    arrays, counts = client_data(seed)
    theirs = flower_aggregate([([a.copy() for a in layers], n) for layers, n in zip(arrays, counts, strict=True)])
    assert_close(ours(arrays, counts), theirs, TOL)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "reference"])
@pytest.mark.parametrize("seed", [0, 3])
def test_matches_flower_fedavg_strategy(seed: int, inplace: bool) -> None:
    arrays, counts = client_data(seed)
    strategy = FlowerFedAvg(inplace=inplace)
    params, _metrics = strategy.aggregate_fit(2, fit_results(arrays, counts), [])  # type: ignore[arg-type]
    assert params is not None
    theirs = parameters_to_ndarrays(params)
    assert [a.dtype for a in theirs] == [np.float32] * len(SHAPES)
    assert_close(ours(arrays, counts), theirs, TOL)


def test_ours_is_closer_to_the_exact_mean_than_one_float32_rounding() -> None:
    # Our float64 accumulation rounds once: at most half a float32 ulp from the exact mean.
    arrays, counts = client_data(5)
    got = ours(arrays, counts)
    for name, g, w in zip(SHAPES, got, exact(arrays, counts), strict=True):
        half_ulp = np.spacing(np.abs(w).astype(np.float32)).astype(np.float64) / 2
        assert np.all(np.abs(g.astype(np.float64) - w) <= half_ulp), name


def test_weighting_differs_from_plain_mean() -> None:
    # Guard against a vacuous cross-check: with these counts the plain mean is far off.
    arrays, counts = client_data(0)
    plain = [np.mean([layers[i] for layers in arrays], axis=0) for i in range(len(SHAPES))]
    diffs = [float(np.max(np.abs(p - o))) for p, o in zip(plain, ours(arrays, counts), strict=True)]
    assert max(diffs) > 100 * TOL
