"""Robust aggregation (median, trimmed mean, Krum, Multi-Krum) checked with exact values.

Importing `strategies.robust` registers the four strategies.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import strategies.robust as robust
from strategies import ClientUpdate, FedAvg
from strategies.base import Strategy, Weights
from strategies.registry import create_strategy, strategy_names
from strategies.robust import (
    CoordinateMedian,
    Krum,
    MultiKrum,
    RobustStrategy,
    TrimmedMean,
    UpdateBuffer,
    pairwise_squared_distances,
)

ROBUST: dict[str, type[RobustStrategy]] = {
    "median": CoordinateMedian,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
    "multi-krum": MultiKrum,
}


def vec(*values: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def one_tensor(rows: list[list[float]], counts: list[int] | None = None) -> list[ClientUpdate]:
    counts = counts or [1] * len(rows)
    return [ClientUpdate({"w": vec(*r)}, n) for r, n in zip(rows, counts, strict=True)]


def run(strategy: Strategy, updates: list[ClientUpdate], template: Weights | None = None) -> Weights:
    agg = strategy.begin_round(1, template if template is not None else dict(updates[0].weights))
    for u in updates:
        agg.add(u)
    return strategy.finish_round(1, {}, agg)


def fill(strategy: RobustStrategy, updates: list[ClientUpdate]) -> UpdateBuffer:
    buffer = strategy.begin_round(1, dict(updates[0].weights))
    for u in updates:
        buffer.add(u)
    return buffer


# Five clients, three coordinates; client 4 is an outlier. Counts differ so that any
# (wrong) example weighting would show.
ROWS = [
    [1.0, 10.0, -3.0],
    [2.0, 20.0, -1.0],
    [3.0, 30.0, -2.0],
    [4.0, 40.0, -5.0],
    [100.0, -50.0, 7.0],
]
COUNTS = [1, 5, 2, 9, 100]


# --------------------------------------------------------------------------- registry


def test_registered_with_needs_all_updates() -> None:
    for name, cls in ROBUST.items():
        assert name in strategy_names()
        assert cls.name == name
        assert cls.needs_all_updates is True
        assert isinstance(create_strategy(name), cls)
    assert FedAvg.needs_all_updates is False


def test_params_and_defaults() -> None:
    assert TrimmedMean().beta == 0.1
    assert Krum().num_malicious == 0
    multi = MultiKrum()
    assert (multi.num_malicious, multi.num_selected) == (0, 0)
    assert CoordinateMedian().spill_threshold_bytes == 256 * 2**20
    s = create_strategy("multi-krum", {"num_malicious": 2, "num_selected": 3, "spill_threshold_bytes": 0})
    assert isinstance(s, MultiKrum)
    assert (s.num_malicious, s.num_selected, s.spill_threshold_bytes) == (2, 3, 0)
    assert create_strategy("trimmed-mean", {"beta": 0}).beta == 0.0  # type: ignore[attr-defined]
    assert create_strategy("krum", {"num_malicious": 2.0}).num_malicious == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("trimmed-mean", {"beta": 0.5}, r"beta .* \[0, 0\.5\)"),
        ("trimmed-mean", {"beta": -0.1}, r"beta"),
        ("trimmed-mean", {"beta": True}, r"beta"),
        ("krum", {"num_malicious": -1}, r"num_malicious must be >= 0"),
        ("krum", {"num_malicious": 1.5}, r"num_malicious must be an integer"),
        ("krum", {"num_malicious": True}, r"num_malicious must be an integer"),
        ("multi-krum", {"num_selected": -2}, r"num_selected must be >= 0"),
        ("median", {"spill_threshold_bytes": -1}, r"spill_threshold_bytes must be >= 0"),
        ("median", {"beta": 0.1}, r"takes"),
    ],
)
def test_bad_params_rejected(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_strategy(name, params)


def test_stateless() -> None:
    for cls in ROBUST.values():
        s = cls()
        assert s.state_dict() == {}
        s.load_state_dict({})
        with pytest.raises(ValueError):
            s.load_state_dict({"x": 1})


# --------------------------------------------------------------------------- median


def test_median_exact_odd() -> None:
    out = run(CoordinateMedian(), one_tensor(ROWS, COUNTS))
    # sorted columns: [1,2,3,4,100] -> 3; [-50,10,20,30,40] -> 20; [-5,-3,-2,-1,7] -> -2
    assert out["w"].tolist() == [3.0, 20.0, -2.0]
    assert out["w"].dtype == torch.float64


def test_median_even_is_mean_of_two_middle_values() -> None:
    # sorted: [1, 2, 4, 10] -> (2 + 4) / 2 = 3;  [-1, 0, 0.5, 8] -> (0 + 0.5) / 2 = 0.25
    rows = [[10.0, 0.5], [2.0, -1.0], [4.0, 8.0], [1.0, 0.0]]
    assert run(CoordinateMedian(), one_tensor(rows))["w"].tolist() == [3.0, 0.25]
    # two clients: the mean of both
    assert run(CoordinateMedian(), one_tensor([[1.0], [4.0]], [1, 1000]))["w"].tolist() == [2.5]


def test_median_even_float32_rounds_once() -> None:
    # The two middles are adjacent float32 values around 1 (ulp 2**-23): their exact mean
    # lies halfway and rounds to even, as float32 (a + b) / 2 would.
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2.0))
    rows = [[float(a)], [float(b)], [-5.0], [9.0]]
    updates = [ClientUpdate({"w": vec(*r, dtype=torch.float32)}, 1) for r in rows]
    out = run(CoordinateMedian(), updates)["w"]
    assert out.dtype == torch.float32
    assert out.item() == float(np.float32((np.float64(a) + np.float64(b)) / 2))


# --------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_exact() -> None:
    # beta = 0.2, n = 5 -> k = int(1.0) = 1 value dropped from each end:
    #   [1,2,3,4,100] -> (2+3+4)/3 = 3;  [-50,10,20,30,40] -> (10+20+30)/3 = 20;
    #   [-5,-3,-2,-1,7] -> (-3-2-1)/3 = -2
    assert run(TrimmedMean(beta=0.2), one_tensor(ROWS, COUNTS))["w"].tolist() == [3.0, 20.0, -2.0]
    # beta = 0.1 (default), n = 5 -> k = int(0.5) = 0: the plain, unweighted mean
    #   (1+2+3+4+100)/5 = 22;  (10+20+30+40-50)/5 = 10;  (-3-1-2-5+7)/5 = -0.8
    assert run(TrimmedMean(), one_tensor(ROWS, COUNTS))["w"].tolist() == pytest.approx([22.0, 10.0, -0.8], abs=1e-15)


def test_trimmed_mean_cut_sizes() -> None:
    # n = 10, beta = 0.25 -> k = 2: values 0..9 plus outliers replaced at both ends
    rows = [[float(v)] for v in [-1000.0, -999.0, 2, 3, 4, 5, 6, 7, 999.0, 1000.0]]
    assert run(TrimmedMean(beta=0.25), one_tensor(rows))["w"].tolist() == [4.5]  # (2+..+7)/6
    t = TrimmedMean(beta=0.1)
    assert [t.num_trimmed(n) for n in (1, 9, 10, 19, 20, 21)] == [0, 0, 1, 1, 2, 2]
    # k is the floor of the floating-point product, like Flower / scipy: 0.29 * 100 is
    # 28.999999999999996 in binary floating point, so 28 are cut, not 29.
    assert TrimmedMean(beta=0.29).num_trimmed(100) == 28
    # always at least one value remains: k < n / 2 for beta < 0.5
    assert all(n - 2 * TrimmedMean(beta=0.49).num_trimmed(n) >= 1 for n in range(1, 200))


# --------------------------------------------------------------------------- krum

# Two tensors flattened to (a0, a1, b). Client 4 is the outlier.
#   squared distances: d(0,1)=1, d(0,2)=1, d(0,3)=4, d(1,2)=2, d(1,3)=5, d(2,3)=5,
#   d(0,4)=100+100+100=300, d(1,4)=81+100+100=281, d(2,4)=281, d(3,4)=100+100+64=264
KRUM_POINTS = [([0.0, 0.0], 0.0), ([1.0, 0.0], 0.0), ([0.0, 1.0], 0.0), ([0.0, 0.0], 2.0), ([10.0, 10.0], 10.0)]
KRUM_COUNTS = [1, 2, 3, 4, 1000]


def krum_updates() -> list[ClientUpdate]:
    return [
        ClientUpdate({"a": vec(*a), "b": torch.tensor(b, dtype=torch.float64)}, n)
        for (a, b), n in zip(KRUM_POINTS, KRUM_COUNTS, strict=True)
    ]


def test_pairwise_distances_over_all_floating_tensors() -> None:
    buffer = fill(Krum(), krum_updates())
    d = pairwise_squared_distances(buffer)
    assert d.tolist() == [
        [0, 1, 1, 4, 300],
        [1, 0, 2, 5, 281],
        [1, 2, 0, 5, 281],
        [4, 5, 5, 0, 264],
        [300, 281, 281, 264, 0],
    ]


def test_krum_scores_and_pick() -> None:
    # f = 1, n = 5: n - f - 2 = 2 nearest neighbours
    #   score0 = 1+1 = 2, score1 = 1+2 = 3, score2 = 1+2 = 3, score3 = 4+5 = 9, score4 = 264+281 = 545
    krum = Krum(num_malicious=1)
    buffer = fill(krum, krum_updates())
    assert krum.scores(buffer).tolist() == [2, 3, 3, 9, 545]
    assert krum.select(buffer) == [0]
    out = krum.finish_round(1, {}, buffer)
    assert out["a"].tolist() == [0.0, 0.0] and out["b"].item() == 0.0
    # f = 0: 3 neighbours -> scores 6, 8, 8, 14, 826; still client 0
    krum0 = Krum()
    buffer = fill(krum0, krum_updates())
    assert krum0.scores(buffer).tolist() == [6, 8, 8, 14, 826]
    assert krum0.select(buffer) == [0]


def test_krum_returns_the_chosen_model_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 4)).astype(np.float32)
    updates = [ClientUpdate({"w": torch.from_numpy(row.copy())}, 1) for row in base]
    krum = Krum(num_malicious=1)
    buffer = fill(krum, updates)
    (chosen,) = krum.select(buffer)
    out = krum.finish_round(1, {}, buffer)["w"]
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(base[chosen]))


def test_multi_krum_selects_lowest_scores_and_averages_unweighted() -> None:
    multi = MultiKrum(num_malicious=1)  # m = n - f = 4
    buffer = fill(multi, krum_updates())
    # scores [2, 3, 3, 9, 545]: the four best are 0, 1, 2, 3 (tie 1/2 broken by arrival)
    assert multi.select(buffer) == [0, 1, 2, 3]
    out = multi.finish_round(1, {}, buffer)
    # unweighted: a = ([0,0]+[1,0]+[0,1]+[0,0]) / 4, b = (0+0+0+2) / 4
    assert out["a"].tolist() == [0.25, 0.25] and out["b"].item() == 0.5

    three = MultiKrum(num_malicious=1, num_selected=3)
    out = run(three, krum_updates())
    assert out["a"].tolist() == pytest.approx([1 / 3, 1 / 3], abs=1e-15) and out["b"].item() == 0.0

    one = MultiKrum(num_malicious=1, num_selected=1)  # m = 1 is Krum
    assert run(one, krum_updates())["a"].tolist() == run(Krum(num_malicious=1), krum_updates())["a"].tolist()


def test_multi_krum_tie_breaks_by_arrival_order() -> None:
    # scores [2, 3, 3, 9, 545]: with m = 2, client 1 (arrived first) beats client 2
    multi = MultiKrum(num_malicious=1, num_selected=2)
    assert multi.select(fill(multi, krum_updates())) == [0, 1]


@pytest.mark.parametrize(("f", "n"), [(0, 1), (0, 2), (1, 3), (1, 4), (2, 6)])
def test_krum_refuses_n_at_most_2f_plus_2(f: int, n: int) -> None:
    for cls in (Krum, MultiKrum):
        strategy = cls(num_malicious=f)
        with pytest.raises(ValueError, match=rf"n > 2f \+ 2 .* f = {f} .*got n = {n}$"):
            strategy.validate_for(n)
        buffer = fill(strategy, krum_updates()[:1] * n)
        with pytest.raises(ValueError, match=rf"f = {f} malicious clients \(at least {2 * f + 3}\), got n = {n}"):
            strategy.finish_round(1, {}, buffer)
        # the refused buffer stays open: one more update makes the round valid
        buffer.add(krum_updates()[1])
        if n + 1 > 2 * f + 2:
            strategy.validate_for(n + 1)
            strategy.finish_round(1, {}, buffer)


def test_krum_min_updates_and_validate_for() -> None:
    krum = Krum(num_malicious=2)
    assert krum.min_updates == 7
    krum.validate_for(7)
    with pytest.raises(ValueError, match="got n = 6"):
        krum.validate_for(6)
    multi = MultiKrum(num_malicious=1, num_selected=6)
    with pytest.raises(ValueError, match="cannot select m = 6 of n = 5"):
        multi.validate_for(5)
    with pytest.raises(ValueError, match="cannot select m = 6 of n = 5"):
        run(multi, krum_updates())
    MultiKrum(num_malicious=1).validate_for(5)
    CoordinateMedian().validate_for(1)
    with pytest.raises(ValueError, match="at least one update"):
        TrimmedMean().validate_for(0)


# --------------------------------------------------------------------------- outliers


def test_outliers_pull_fedavg_but_not_robust_rules() -> None:
    rng = np.random.default_rng(7)
    honest = [rng.normal(1.0, 0.1, size=20) for _ in range(9)]
    attack = [np.full(20, 1e6), np.full(20, -3e5)]
    updates = [ClientUpdate({"w": torch.from_numpy(h)}, 10) for h in honest]
    # attackers also claim huge example counts
    updates += [ClientUpdate({"w": torch.from_numpy(a)}, 10_000) for a in attack]
    lo, hi = np.min(honest, axis=0), np.max(honest, axis=0)

    fedavg = run(FedAvg(), updates)["w"].numpy()
    assert np.all(np.abs(fedavg - 1.0) > 1e4)

    n, f = len(updates), len(attack)
    rules: list[RobustStrategy] = [
        CoordinateMedian(),
        TrimmedMean(beta=0.2),  # k = int(2.2) = 2 >= f
        Krum(num_malicious=f),
        MultiKrum(num_malicious=f),  # m = n - f = 9
    ]
    for rule in rules:
        got = run(rule, updates)["w"].numpy()
        assert np.all((lo <= got) & (got <= hi)), rule.name
        assert np.max(np.abs(got - 1.0)) < 0.5, rule.name
    multi = MultiKrum(num_malicious=f)
    assert sorted(multi.select(fill(multi, updates))) == list(range(n - f))  # exactly the honest ones


# --------------------------------------------------------------------------- integer tensors and dtypes


def test_integer_tensors_take_fedavg_rounded_weighted_mean() -> None:
    # counts 1, 1, 2: (1*1 + 1*2 + 2*10) / 4 = 23/4 = 5.75 -> 6 ; (1*0 + 1*0 + 2*1)/4 = 0.5 -> 0 (half to even)
    updates = [
        ClientUpdate({"w": vec(0.0, 0.0), "steps": torch.tensor([1, 0])}, 1),
        ClientUpdate({"w": vec(1.0, 0.0), "steps": torch.tensor([2, 0])}, 1),
        ClientUpdate({"w": vec(0.0, 1.0), "steps": torch.tensor([10, 1])}, 2),
    ]
    fedavg_steps = run(FedAvg(), updates)["steps"]
    for rule in (CoordinateMedian(), TrimmedMean(), Krum(), MultiKrum()):
        out = run(rule, updates)
        assert out["steps"].dtype == torch.int64
        assert out["steps"].tolist() == [6, 0] == fedavg_steps.tolist()
        assert list(out) == ["w", "steps"]


def test_dtypes_and_order_preserved() -> None:
    template = {
        "half": torch.zeros(2, dtype=torch.float16),
        "bf": torch.zeros(2, dtype=torch.bfloat16),
        "single": torch.zeros(2, 2, dtype=torch.float32),
        "count": torch.zeros((), dtype=torch.int64),
        "scalar": torch.zeros((), dtype=torch.float32),
    }
    updates = [ClientUpdate({k: torch.full_like(t, float(i)) for k, t in template.items()}, 1) for i in range(1, 6)]
    buffer = CoordinateMedian().begin_round(1, template)
    assert buffer.row_dtype == np.float32 and buffer.row_size == 9
    out = run(CoordinateMedian(), updates, template)
    assert list(out) == list(template)
    for k, t in template.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape
        assert torch.all(out[k] == 3), k
    wide = CoordinateMedian().begin_round(1, {"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.float64)})
    assert wide.row_dtype == np.float64


def test_float64_model_keeps_float64_precision() -> None:
    x = 1.0 + 2.0**-40  # not representable in float32
    updates = [ClientUpdate({"w": vec(x)}, 1)] * 3
    for rule in ROBUST.values():
        assert run(rule(), updates)["w"].item() == x


# --------------------------------------------------------------------------- validation


def good_and_bad_updates() -> tuple[list[ClientUpdate], list[ClientUpdate]]:
    good = [ClientUpdate({"w": vec(*r), "c": torch.tensor(i)}, i + 1) for i, r in enumerate(ROWS)]
    bad = [
        ClientUpdate({"w": vec(1.0, 2.0), "c": torch.tensor(1)}, 1),  # wrong shape
        ClientUpdate({"w": vec(1.0, 2.0, 3.0)}, 1),  # missing tensor
        ClientUpdate({"w": vec(1.0, 2.0, 3.0), "c": torch.tensor(1), "x": vec(1.0)}, 1),  # extra tensor
        ClientUpdate({"w": vec(1.0, float("nan"), 3.0), "c": torch.tensor(1)}, 1),  # NaN
        ClientUpdate({"w": vec(1.0, float("inf"), 3.0), "c": torch.tensor(1)}, 1),  # Inf
        ClientUpdate({"w": vec(1.0, 2.0, 3.0), "c": torch.tensor(1)}, 0),  # no examples
    ]
    return good, bad


@pytest.mark.parametrize("threshold", [robust.DEFAULT_SPILL_THRESHOLD_BYTES, 0], ids=["memory", "spilled"])
def test_bad_update_leaves_state_untouched(threshold: int) -> None:
    good, bad = good_and_bad_updates()
    for rule in (CoordinateMedian, TrimmedMean, Krum, MultiKrum):
        strategy = rule(spill_threshold_bytes=threshold)
        buffer = strategy.begin_round(1, dict(good[0].weights))
        reference = strategy.begin_round(1, dict(good[0].weights))
        for i, u in enumerate(good):
            buffer.add(ClientUpdate(u.weights, u.num_examples, {"loss": float(i)}))
            reference.add(ClientUpdate(u.weights, u.num_examples, {"loss": float(i)}))
            for b in bad:
                with pytest.raises(ValueError):
                    buffer.add(ClientUpdate(b.weights, b.num_examples, {"loss": 1e9}))
            assert buffer.num_updates == buffer.num_rows == i + 1
            assert buffer.example_counts == reference.example_counts
            assert buffer.num_examples == reference.num_examples
            assert buffer.metrics() == reference.metrics()
        assert buffer.spilled == (threshold == 0)
        for j in range(len(good)):
            assert np.array_equal(buffer.row(j), reference.row(j))
        got, want = strategy.finish_round(1, {}, buffer), strategy.finish_round(1, {}, reference)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_error_messages_name_the_problem() -> None:
    good, bad = good_and_bad_updates()
    buffer = CoordinateMedian().begin_round(1, dict(good[0].weights))
    with pytest.raises(ValueError, match=r"\['w'\] differ in shape"):
        buffer.add(bad[0])
    with pytest.raises(ValueError, match="differ from the global model's"):
        buffer.add(bad[1])
    with pytest.raises(ValueError, match="NaN or Inf values in w"):
        buffer.add(bad[3])
    with pytest.raises(ValueError, match="no update to aggregate"):
        buffer.result()


# --------------------------------------------------------------------------- spill to disk


@pytest.fixture
def spill_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty directory so leftover spill files would show."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def random_updates(seed: int, n: int = 9) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            {
                "conv": torch.from_numpy(rng.normal(size=(3, 2, 2)).astype(np.float32)),
                "steps": torch.tensor(int(rng.integers(0, 100))),
                "bias": torch.from_numpy(rng.normal(size=5).astype(np.float32)),
            },
            int(rng.integers(1, 50)),
        )
        for _ in range(n)
    ]


def make(name: str, **params: object) -> RobustStrategy:
    extra = {"trimmed-mean": {"beta": 0.2}, "krum": {"num_malicious": 2}, "multi-krum": {"num_malicious": 2}}
    strategy = create_strategy(name, {**extra.get(name, {}), **params})  # type: ignore[dict-item]
    assert isinstance(strategy, RobustStrategy)
    return strategy


@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("block_bytes", [robust.DEFAULT_BLOCK_BYTES, 8 * 9 * 3], ids=["one-block", "3-col-blocks"])
def test_spilled_results_equal_in_memory(name: str, block_bytes: int, spill_dir: Path) -> None:
    updates = random_updates(1)
    row_bytes = 17 * 4
    results = []
    for threshold in (robust.DEFAULT_SPILL_THRESHOLD_BYTES, 3 * row_bytes, 1, 0):
        strategy = make(name, spill_threshold_bytes=threshold)
        strategy.block_bytes = block_bytes
        buffer = strategy.begin_round(1, dict(updates[0].weights))
        assert buffer.row_size == 17
        for i, u in enumerate(updates):
            buffer.add(u)
            expect_spilled = threshold < (i + 1) * row_bytes
            assert buffer.spilled == expect_spilled
            assert buffer.in_memory_bytes == (0 if expect_spilled else (i + 1) * row_bytes)
        if buffer.spilled:
            path = buffer.spill_path
            assert path is not None and path.exists() and path.parent.parent == spill_dir
            assert path.stat().st_size >= len(updates) * row_bytes
        results.append(strategy.finish_round(1, {}, buffer))
        assert buffer.spill_path is None
        assert list(spill_dir.iterdir()) == []  # temp dir removed by finish_round's close()
    for other in results[1:]:
        assert all(torch.equal(other[k], results[0][k]) for k in results[0])


def test_spill_file_grows_and_close_removes_it(spill_dir: Path) -> None:
    updates = random_updates(2, n=20)
    buffer = make("median", spill_threshold_bytes=0).begin_round(1, dict(updates[0].weights))
    for u in updates:
        buffer.add(u)
    assert buffer.spilled and len(list(spill_dir.iterdir())) == 1
    for i, u in enumerate(updates):
        flat = np.concatenate([u.weights["conv"].numpy().ravel(), u.weights["bias"].numpy().ravel()])
        assert np.array_equal(buffer.row(i), flat.astype(np.float64))
    buffer.close()
    buffer.close()  # idempotent
    assert list(spill_dir.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        buffer.result()
    with pytest.raises(ValueError, match="closed"):
        buffer.add(updates[0])


def test_spill_removed_when_buffer_is_garbage_collected(spill_dir: Path) -> None:
    updates = random_updates(3, n=4)
    buffer = make("krum", num_malicious=0, spill_threshold_bytes=0).begin_round(1, dict(updates[0].weights))
    for u in updates:
        buffer.add(u)
    assert len(list(spill_dir.iterdir())) == 1
    del buffer
    gc.collect()
    assert list(spill_dir.iterdir()) == []


def test_context_manager_closes(spill_dir: Path) -> None:
    updates = random_updates(4, n=3)
    with make("median", spill_threshold_bytes=0).begin_round(1, dict(updates[0].weights)) as buffer:
        for u in updates:
            buffer.add(u)
        assert buffer.spilled
    assert list(spill_dir.iterdir()) == []


def test_finish_round_closes_but_metrics_remain() -> None:
    # The daemon reads aggregate.metrics() after finish_round.
    strategy = CoordinateMedian()
    buffer = strategy.begin_round(1, {"w": torch.zeros(1)})
    buffer.add(ClientUpdate({"w": torch.ones(1)}, 1, {"train_loss": 2.0}))
    buffer.add(ClientUpdate({"w": torch.ones(1)}, 3, {"train_loss": 4.0}))
    strategy.finish_round(1, {}, buffer)
    assert buffer.metrics() == {"train_loss": 3.5}
    with pytest.raises(ValueError, match="closed"):
        buffer.result()


def test_finish_round_needs_an_update_buffer() -> None:
    fedavg_agg = FedAvg().begin_round(1, {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="UpdateBuffer"):
        CoordinateMedian().finish_round(1, {}, fedavg_agg)


def test_model_without_floating_tensors() -> None:
    updates = [ClientUpdate({"c": torch.tensor([i])}, 1) for i in (1, 2, 3)]
    for rule in ROBUST.values():
        assert run(rule(spill_threshold_bytes=0), updates)["c"].tolist() == [2]
