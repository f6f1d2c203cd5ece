"""Cross-check the robust strategies against Flower 1.41's on identical seeded inputs.

Flower's strategies (`FedMedian`, `FedTrimmedAvg`, `Krum`) work on float32 arrays; ours
compute in float64 and round once to float32, so values agree to a float32 ulp or so,
hence the 1e-6 tolerance on values of order 1. Where ours deliberately differs (see the
`strategies.robust` docstring) the difference is asserted explicitly below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedMedian as FlowerFedMedian
from flwr.server.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.server.strategy import Krum as FlowerKrum
from flwr.server.strategy.aggregate import aggregate as flower_weighted_mean

from strategies.base import ClientUpdate
from strategies.robust import CoordinateMedian, Krum, MultiKrum, RobustStrategy, TrimmedMean

pytestmark = pytest.mark.flower

SHAPES = {
    "conv.weight": (4, 3, 3, 3),
    "conv.bias": (4,),
    "fc.weight": (10, 36),
    "fc.bias": (10,),
    "scale": (),
}
TOL = 1e-6

Arrays = list[list[np.ndarray]]


def client_data(seed: int, num_clients: int) -> tuple[Arrays, list[int]]:
    rng = np.random.default_rng(seed)
    counts = [int(n) for n in rng.integers(1, 600, size=num_clients)]
    assert len(set(counts)) > 1  # any example weighting would show
    arrays = [
        [rng.uniform(-2.0, 2.0, size=shape).astype(np.float32) for shape in SHAPES.values()] for _ in range(num_clients)
    ]
    return arrays, counts


def with_outliers(seed: int, num_clients: int, num_bad: int) -> tuple[Arrays, list[int]]:
    """Honest clients near a common model plus `num_bad` far away, so Krum's choice is clear-cut."""
    rng = np.random.default_rng(seed)
    center = [np.asarray(rng.uniform(-1.0, 1.0, size=shape), dtype=np.float32) for shape in SHAPES.values()]
    arrays = [
        [np.asarray(c + rng.normal(0.0, 0.05, size=c.shape), dtype=np.float32) for c in center]
        for _ in range(num_clients - num_bad)
    ]
    arrays += [[np.asarray(c + 50.0 + 10 * i, dtype=np.float32) for c in center] for i in range(num_bad)]
    counts = [int(n) for n in rng.integers(1, 600, size=num_clients)]
    return arrays, counts


def ours(strategy: RobustStrategy, arrays: Arrays, counts: list[int]) -> list[np.ndarray]:
    template = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in SHAPES.items()}
    agg = strategy.begin_round(2, template)
    for layers, n in zip(arrays, counts, strict=True):
        agg.add(ClientUpdate({name: torch.from_numpy(a.copy()) for name, a in zip(SHAPES, layers, strict=True)}, n))
    out = strategy.finish_round(2, template, agg)
    assert list(out) == list(SHAPES)
    for name, t in out.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == SHAPES[name]
    return [t.numpy() for t in out.values()]


def fit_results(arrays: Arrays, counts: list[int]) -> list[tuple[None, FitRes]]:
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
        for layers, n in zip(arrays, counts, strict=True)
    ]


def theirs(strategy: object, arrays: Arrays, counts: list[int]) -> list[np.ndarray]:
    params, _ = strategy.aggregate_fit(2, fit_results(arrays, counts), [])  # type: ignore[attr-defined]
    assert params is not None
    return parameters_to_ndarrays(params)


def max_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    assert len(got) == len(want)
    diffs = [0.0]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        if g.size:
            diffs.append(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))))
    return max(diffs)


def assert_close(got: list[np.ndarray], want: list[np.ndarray], tol: float = TOL) -> None:
    diff = max_diff(got, want)
    assert diff <= tol, f"max abs diff {diff} > {tol}"


def unweighted_mean(arrays: Arrays, chosen: list[int]) -> list[np.ndarray]:
    return [np.mean([arrays[i][k].astype(np.float64) for i in chosen], axis=0) for k in range(len(SHAPES))]


# --------------------------------------------------------------------------- median


@pytest.mark.parametrize("num_clients", [5, 6, 7, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_median_matches_fedmedian(seed: int, num_clients: int) -> None:
    # Even counts too: both take the mean of the two middle values (np.median).
    arrays, counts = client_data(seed, num_clients)
    got, want = ours(CoordinateMedian(), arrays, counts), theirs(FlowerFedMedian(), arrays, counts)
    assert_close(got, want)
    if num_clients % 2:  # an odd median is one of the inputs: exact
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_median_difference_integer_tensors() -> None:
    # Documented difference: Flower takes the median of integer arrays too; we treat
    # integer tensors (e.g. num_batches_tracked) as FedAvg does, the example-weighted mean
    # rounded, because they are bookkeeping, not learned parameters.
    values, counts = [1, 2, 3, 100, 200], [1, 1, 1, 1, 6]
    arrays = [[np.array([v], dtype=np.int64)] for v in values]
    (flower,) = parameters_to_ndarrays(FlowerFedMedian().aggregate_fit(2, fit_results(arrays, counts), [])[0])  # type: ignore[arg-type]
    assert flower.tolist() == [3]
    strategy = CoordinateMedian()
    agg = strategy.begin_round(2, {"n": torch.zeros(1, dtype=torch.int64)})
    for v, n in zip(values, counts, strict=True):
        agg.add(ClientUpdate({"n": torch.tensor([v])}, n))
    # (1 + 2 + 3 + 100 + 6 * 200) / 10 = 130.6 -> 131
    assert strategy.finish_round(2, {}, agg)["n"].tolist() == [131]


def test_nan_difference() -> None:
    # Documented difference: Flower's median propagates a client's NaN into the global
    # model; we reject the update (and the daemon already refuses non-finite uploads).
    arrays, counts = client_data(3, 5)
    arrays[2][0] = arrays[2][0].copy()
    arrays[2][0].flat[0] = np.nan
    assert np.isnan(theirs(FlowerFedMedian(), arrays, counts)[0].flat[0])
    with pytest.raises(ValueError, match="NaN or Inf values in conv.weight"):
        ours(CoordinateMedian(), arrays, counts)


# --------------------------------------------------------------------------- trimmed mean


@pytest.mark.parametrize(("beta", "num_clients"), [(0.1, 7), (0.1, 10), (0.2, 7), (0.2, 10), (0.3, 10), (0.45, 9)])
def test_trimmed_mean_matches_fedtrimmedavg(beta: float, num_clients: int) -> None:
    arrays, counts = client_data(int(beta * 100) + num_clients, num_clients)
    got = ours(TrimmedMean(beta=beta), arrays, counts)
    assert_close(got, theirs(FlowerFedTrimmedAvg(beta=beta), arrays, counts))
    # guard against a vacuous check: where something is trimmed, it is not the plain mean
    if int(beta * num_clients) > 0:
        assert max_diff(got, unweighted_mean(arrays, list(range(num_clients)))) > 100 * TOL


def test_trimmed_mean_same_floating_point_cut() -> None:
    # Both cut int(beta * n) from each end: with beta = 0.29, n = 100 that is 28 (the
    # float product is 28.999999999999996), not the 29 of exact decimal arithmetic.
    rng = np.random.default_rng(11)
    arrays = [[rng.normal(size=3).astype(np.float32)] for _ in range(100)]
    counts = [1] * 100
    strategy = TrimmedMean(beta=0.29)
    assert strategy.num_trimmed(100) == 28
    agg = strategy.begin_round(2, {"w": torch.zeros(3)})
    for (a,), n in zip(arrays, counts, strict=True):
        agg.add(ClientUpdate({"w": torch.from_numpy(a.copy())}, n))
    got = strategy.finish_round(2, {}, agg)["w"].numpy()
    (want,) = theirs(FlowerFedTrimmedAvg(beta=0.29), arrays, counts)
    assert float(np.max(np.abs(got - want))) <= TOL


def test_trimmed_mean_default_beta_differs() -> None:
    # Documented difference: our default trims 10% from each end, Flower's 20%.
    assert TrimmedMean().beta == 0.1
    assert FlowerFedTrimmedAvg().beta == 0.2
    arrays, counts = client_data(4, 10)
    assert_close(ours(TrimmedMean(), arrays, counts), theirs(FlowerFedTrimmedAvg(beta=0.1), arrays, counts))


# --------------------------------------------------------------------------- krum


def chosen_index(arrays: Arrays, model: list[np.ndarray]) -> int:
    (index,) = [
        i for i, layers in enumerate(arrays) if all(np.array_equal(a, m) for a, m in zip(layers, model, strict=True))
    ]
    return index


@pytest.mark.parametrize(("f", "num_clients"), [(0, 7), (1, 7), (2, 7), (3, 9)])
@pytest.mark.parametrize("outliers", [False, True], ids=["uniform", "outliers"])
def test_krum_matches_flower_krum(f: int, num_clients: int, outliers: bool) -> None:
    if outliers:
        arrays, counts = with_outliers(f + num_clients, num_clients, num_bad=f)
    else:
        arrays, counts = client_data(f + num_clients, num_clients)
    strategy = Krum(num_malicious=f)
    got = ours(strategy, arrays, counts)
    want = theirs(FlowerKrum(num_malicious_clients=f), arrays, counts)
    # Both return one client's model unchanged: the same one, bit for bit.
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    if outliers:
        assert chosen_index(arrays, got) < num_clients - f  # an honest one


@pytest.mark.parametrize(("f", "m", "num_clients"), [(0, 3, 7), (1, 4, 7), (2, 3, 8), (1, 6, 7)])
def test_multi_krum_same_selection_equal_counts(f: int, m: int, num_clients: int) -> None:
    # With equal example counts Flower's weighted average is our unweighted one.
    arrays, _ = client_data(10 * f + m, num_clients)
    counts = [50] * num_clients
    got = ours(MultiKrum(num_malicious=f, num_selected=m), arrays, counts)
    assert_close(got, theirs(FlowerKrum(num_malicious_clients=f, num_clients_to_keep=m), arrays, counts))


@pytest.mark.parametrize(("f", "m", "num_clients"), [(0, 3, 7), (1, 4, 7), (2, 3, 8), (1, 6, 7)])
def test_multi_krum_weighting_difference(f: int, m: int, num_clients: int) -> None:
    # Documented difference: both score once and keep the same m updates, but Flower
    # averages them weighted by example count while we take the paper's unweighted mean
    # ((1/m) Σ V*_i): self-reported counts must not buy a selected attacker influence.
    arrays, counts = client_data(10 * f + m + 1, num_clients)
    strategy = MultiKrum(num_malicious=f, num_selected=m)
    template = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    buffer = strategy.begin_round(2, template)
    for layers, n in zip(arrays, counts, strict=True):
        buffer.add(ClientUpdate({k: torch.from_numpy(a.copy()) for k, a in zip(SHAPES, layers, strict=True)}, n))
    chosen = strategy.select(buffer)
    assert len(chosen) == m
    buffer.close()

    flower = theirs(FlowerKrum(num_malicious_clients=f, num_clients_to_keep=m), arrays, counts)
    # Flower kept the same set: its output is the example-weighted mean of our selection ...
    assert_close(flower, flower_weighted_mean([(arrays[i], counts[i]) for i in chosen]))
    # ... ours is the unweighted mean of it, and the two differ measurably.
    got = ours(MultiKrum(num_malicious=f, num_selected=m), arrays, counts)
    assert_close(got, unweighted_mean(arrays, chosen))
    assert max_diff(got, flower) > 100 * TOL


def test_multi_krum_default_m_differs() -> None:
    # Documented difference: our num_selected=0 means m = n − f; Flower's
    # num_clients_to_keep=0 (its default) means plain Krum. Same result once m is explicit.
    assert MultiKrum(num_malicious=1).selection_size(7) == 6
    assert FlowerKrum().num_clients_to_keep == 0
    arrays, _ = client_data(21, 7)
    counts = [1] * 7
    got = ours(MultiKrum(num_malicious=1), arrays, counts)
    assert_close(got, theirs(FlowerKrum(num_malicious_clients=1, num_clients_to_keep=6), arrays, counts))
    assert max_diff(got, theirs(FlowerKrum(num_malicious_clients=1), arrays, counts)) > 100 * TOL


@pytest.mark.parametrize(("f", "num_clients"), [(1, 4), (2, 6), (2, 5), (0, 2)])
def test_krum_refusal_difference(f: int, num_clients: int) -> None:
    # Documented difference: with n <= 2f + 2 Flower still answers, using
    # max(1, n − f − 2) neighbours (no longer Krum's guarantee); we refuse the round.
    arrays, counts = client_data(f + num_clients + 30, num_clients)
    flower = theirs(FlowerKrum(num_malicious_clients=f), arrays, counts)
    assert chosen_index(arrays, flower) in range(num_clients)
    for strategy in (Krum(num_malicious=f), MultiKrum(num_malicious=f)):
        with pytest.raises(ValueError, match=rf"f = {f} malicious clients .* got n = {num_clients}"):
            ours(strategy, arrays, counts)


def test_krum_nan_difference() -> None:
    # Documented difference: a NaN update gets a NaN score, and np.argmin returns the
    # first NaN, so Flower's Krum picks the poisoned model; we reject the update.
    arrays, counts = client_data(5, 7)
    arrays[4][2] = arrays[4][2].copy()
    arrays[4][2].flat[7] = np.nan
    flower = theirs(FlowerKrum(num_malicious_clients=1), arrays, counts)
    assert np.isnan(flower[2].flat[7])
    with pytest.raises(ValueError, match="NaN or Inf values in fc.weight"):
        ours(Krum(num_malicious=1), arrays, counts)
