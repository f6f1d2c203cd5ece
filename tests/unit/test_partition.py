"""Partitioners: exact coverage, determinism, label skew, quantity skew, lazy access, spec parsing."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from simulations.partition import (
    DirichletPartitioner,
    IidPartitioner,
    QuantityPartitioner,
    ShardsPartitioner,
    parse_partition_label,
    parse_partitioner,
    partition_indices,
    quantity_sizes,
)

# 10 classes, unequal class sizes, shuffled: like a real labelled dataset.
_RNG = np.random.default_rng(12345)
LABELS = _RNG.permutation(np.repeat(np.arange(10), np.arange(60, 160, 10)))
SPECS = ["iid", "dirichlet:0.5", "dirichlet:0.1", "dirichlet:100", "shards:2", "shards:3", "quantity:0", "quantity:1.5"]


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each partition sorted, no duplicates"
    merged = np.concatenate(parts)
    assert merged.size == n
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10).astype(float)
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_partitions", [1, 7, 20])
def test_every_index_exactly_once(spec: str, num_partitions: int) -> None:
    parts = parse_partitioner(spec).split(LABELS, num_partitions, seed=3)
    _assert_exact_cover(parts, LABELS.size, num_partitions)
    assert min(p.size for p in parts) >= 1


def test_accepts_torch_labels_like_numpy() -> None:
    for spec in SPECS:
        partitioner = parse_partitioner(spec)
        from_torch = partitioner.split(torch.from_numpy(LABELS), 8, seed=1)
        from_numpy = partitioner.split(LABELS, 8, seed=1)
        for a, b in zip(from_torch, from_numpy, strict=True):
            np.testing.assert_array_equal(a, b)


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [p.size for p in IidPartitioner().split(LABELS, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_split_other_seed_differs(spec: str) -> None:
    partitioner = parse_partitioner(spec)
    first = partitioner.split(LABELS, 10, seed=42)
    again = partitioner.split(LABELS, 10, seed=42)
    other = partitioner.split(LABELS, 10, seed=43)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(a.size != b.size or not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_more_than_iid() -> None:
    iid = _mean_label_entropy(LABELS, IidPartitioner().split(LABELS, 10, seed=0))
    skewed = _mean_label_entropy(LABELS, DirichletPartitioner(0.1).split(LABELS, 10, seed=0))
    nearly_iid = _mean_label_entropy(LABELS, DirichletPartitioner(1000.0).split(LABELS, 10, seed=0))
    # IID partitions of ~100 examples hold nearly all 10 classes (entropy near ln 10 = 2.30).
    assert iid > 2.1
    assert skewed < iid - 0.8
    assert abs(nearly_iid - iid) < 0.15


def test_min_size_is_enforced_by_redrawing() -> None:
    parts = DirichletPartitioner(0.1, min_size=20).split(LABELS, 10, seed=0)
    _assert_exact_cover(parts, LABELS.size, 10)
    assert min(p.size for p in parts) >= 20


def test_impossible_min_size_raises_with_explanation() -> None:
    # 2 examples of 1 class over 2 partitions: with tiny alpha one side is almost always
    # empty, and the bounded retries must end in a clear error, not a hang.
    labels = np.array([0, 0])
    with pytest.raises(ValueError, match="alpha"):
        DirichletPartitioner(1e-3, min_size=1, max_tries=5).split(labels, 2, seed=0)
    with pytest.raises(ValueError, match="at least"):
        DirichletPartitioner(1.0, min_size=60).split(LABELS, 20, seed=0)


def test_more_partitions_than_examples_raises() -> None:
    with pytest.raises(ValueError):
        IidPartitioner().split(np.arange(3), 4, seed=0)
    with pytest.raises(ValueError):
        IidPartitioner().split(np.arange(3), 0, seed=0)


def test_parse_partitioner_accepted_forms() -> None:
    assert isinstance(parse_partitioner("iid"), IidPartitioner)
    dirichlet = parse_partitioner("dirichlet:0.5")
    assert isinstance(dirichlet, DirichletPartitioner)
    assert dirichlet.alpha == 0.5
    assert parse_partitioner("dirichlet:2").alpha == 2.0  # type: ignore[attr-defined]
    assert parse_partitioner(" shards:2 ") == ShardsPartitioner(2)
    assert parse_partitioner("quantity:1.5") == QuantityPartitioner(1.5)
    assert parse_partitioner("quantity:0") == QuantityPartitioner(0.0)
    assert [str(parse_partitioner(s)) for s in ("shards:10", "quantity:0.50")] == ["shards:10", "quantity:0.5"]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "IID",
        "iid:1",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:abc",
        "dirichlet:nan",
        "dirichlet:inf",
        "shards",
        "shards:",
        "shards:0",
        "shards:-1",
        "shards:1.5",
        "shards:two",
        "quantity",
        "quantity:",
        "quantity:-0.5",
        "quantity:nan",
        "quantity:inf",
        "quantity:x",
        "lognormal:1",
    ],
)
def test_parse_partitioner_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"iid.*dirichlet:ALPHA"):
        parse_partitioner(spec)


@pytest.mark.parametrize(("text", "expected"), [("2/4", (2, 4)), ("0/1", (0, 1)), ("9/10", (9, 10))])
def test_parse_partition_label(text: str, expected: tuple[int, int]) -> None:
    assert parse_partition_label(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1/0", "2", "a/4", "2/b", "2/4/6", "", "1.5/4"])
def test_parse_partition_label_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="i/N|0 <= i < N"):
        parse_partition_label(text)


# --- shards (McMahan et al. 2017) -------------------------------------------------


def test_shards_pathological_split_on_label_sorted_data() -> None:
    # The FedAvg paper's MNIST setting in miniature: 100 clients x 2 shards of 30 examples.
    labels = np.repeat(np.arange(10), 600)
    parts = ShardsPartitioner(2).split(labels, 100, seed=0)
    _assert_exact_cover(parts, labels.size, 100)
    assert {p.size for p in parts} == {60}
    labels_per_client = [np.unique(labels[p]).size for p in parts]
    assert max(labels_per_client) <= 2  # shards never straddle a label boundary here (600 / 60 whole)
    assert np.mean(labels_per_client) > 1.5  # most clients get two different labels
    assert (
        _mean_label_entropy(labels, parts) < 0.7 < _mean_label_entropy(labels, IidPartitioner().split(labels, 100, 0))
    )


def test_shards_unequal_classes_mostly_two_labels() -> None:
    parts = ShardsPartitioner(2).split(LABELS, 20, seed=1)
    _assert_exact_cover(parts, LABELS.size, 20)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 2  # shards equal up to one example each
    counts = [np.unique(LABELS[p]).size for p in parts]
    # A shard may straddle two labels, so a client holds at most 2 * 2 labels, typically <= 2.
    assert max(counts) <= 4
    assert np.median(counts) <= 2


def test_shards_more_shards_per_client_means_more_labels() -> None:
    labels = np.repeat(np.arange(10), 600)
    two = np.mean([np.unique(labels[p]).size for p in ShardsPartitioner(2).split(labels, 50, 0)])
    ten = np.mean([np.unique(labels[p]).size for p in ShardsPartitioner(10).split(labels, 50, 0)])
    assert ten > two + 3


def test_shards_too_few_examples_raises() -> None:
    with pytest.raises(ValueError, match="only 39 examples"):
        ShardsPartitioner(2).split(np.zeros(39, dtype=np.int64), 20, seed=0)
    ShardsPartitioner(2).split(np.zeros(40, dtype=np.int64), 20, seed=0)  # exactly one example per shard
    with pytest.raises(ValueError):
        ShardsPartitioner(0)


# --- quantity skew ---------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 3.0, 50.0])
def test_quantity_sizes_sum_and_minimum(sigma: float) -> None:
    sizes = quantity_sizes(1000, 200, sigma, np.random.default_rng(0))
    assert sizes.dtype == np.int64
    assert sizes.sum() == 1000
    assert sizes.min() >= 1


def test_quantity_size_variance_grows_with_sigma() -> None:
    def spread(sigma: float) -> float:
        return float(
            np.mean([np.std([p.size for p in QuantityPartitioner(sigma).split(LABELS, 20, s)]) for s in range(5)])
        )

    spreads = [spread(s) for s in (0.0, 0.3, 1.0, 2.0)]
    assert spreads[0] <= 0.5  # sigma 0: equal up to one
    assert spreads == sorted(spreads)
    assert spreads[-1] > 4 * spreads[1]


def test_quantity_labels_stay_iid() -> None:
    parts = QuantityPartitioner(0.5).split(LABELS, 5, seed=0)
    overall = np.bincount(LABELS, minlength=10) / LABELS.size
    for part in parts:
        share = np.bincount(LABELS[part], minlength=10) / part.size
        assert np.abs(share - overall).max() < 0.08


# --- lazy single-partition access ------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_partitions", [1, 7, 20])
def test_partition_indices_equals_split(spec: str, num_partitions: int) -> None:
    full = parse_partitioner(spec).split(LABELS, num_partitions, seed=11)
    for index in range(num_partitions):
        one = partition_indices(spec, LABELS, num_partitions, index, seed=11)
        assert one.dtype == np.int64
        np.testing.assert_array_equal(one, full[index])
    # Accepts a parsed partitioner and torch labels too.
    np.testing.assert_array_equal(
        partition_indices(parse_partitioner(spec), torch.from_numpy(LABELS), num_partitions, 0, seed=11), full[0]
    )


def test_partition_indices_result_is_a_private_copy() -> None:
    for spec in SPECS:
        first = partition_indices(spec, LABELS, 5, 0, seed=2)
        first[:] = -1
        assert partition_indices(spec, LABELS, 5, 0, seed=2).min() >= 0


def test_partition_indices_rejects_bad_index() -> None:
    with pytest.raises(ValueError, match="out of range"):
        partition_indices("iid", LABELS, 5, 5, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        partition_indices("quantity:1", LABELS, 5, -1, seed=0)
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition_indices("nope", LABELS, 5, 0, seed=0)


@pytest.mark.parametrize("spec", ["iid", "quantity:1"])
def test_lazy_partitions_of_a_huge_population_stay_cheap(spec: str) -> None:
    # 100,000 virtual clients over 100,000 examples: materialising every partition would
    # hold 100,000 arrays; the lazy path holds one permutation (+ offsets for quantity).
    # Every 10th client is fetched under tracemalloc (which slows Python ~5x).
    n, stride = 100_000, 10
    labels = np.random.default_rng(0).integers(0, 10, n)
    seen = np.zeros(n, dtype=np.int64)
    started = time.perf_counter()
    tracemalloc.start()
    try:
        for index in range(0, n, stride):
            seen[partition_indices(spec, labels, n, index, seed=7)] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert seen.sum() == n // stride and seen.max() == 1  # disjoint, one example per client here
    assert time.perf_counter() - started < 20


def test_lazy_quantity_with_uneven_sizes_covers_exactly() -> None:
    n, clients = 100_000, 10_000
    labels = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=np.int64)
    sizes = []
    for index in range(clients):
        part = partition_indices("quantity:1", labels, clients, index, seed=3)
        seen[part] += 1
        sizes.append(part.size)
    assert np.all(seen == 1)
    assert min(sizes) >= 1 and max(sizes) > 5 * np.median(sizes)
