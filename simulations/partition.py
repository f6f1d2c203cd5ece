"""Partitioners: split a labelled dataset's indices among virtual clients.

Federated results depend heavily on how data is spread over clients, so the split is
a named, parsed spec (``"iid"``, ``"dirichlet:0.5"``, ``"shards:2"``, ``"quantity:1.0"``)
recorded with every run, and it is a pure function of (labels, number of partitions,
seed): the same seed always gives the same clients, which is what makes simulations
reproducible.

``partition_indices`` returns a single client's indices. For ``iid`` and ``quantity`` it
never builds the other clients' arrays: one seeded permutation of the dataset plus
integer offsets (cached per (spec, dataset size, partitions, seed)), so a population of
100,000 virtual clients costs O(dataset) memory instead of 100,000 Python objects.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

ACCEPTED_SPECS = (
    '"iid", "dirichlet:ALPHA" (ALPHA a positive float, e.g. "dirichlet:0.5"), '
    '"shards:K" (K a positive integer, e.g. "shards:2") or '
    '"quantity:SIGMA" (SIGMA a non-negative float, e.g. "quantity:1.0")'
)

Labels = torch.Tensor | npt.NDArray[np.integer]


@runtime_checkable
class Partitioner(Protocol):
    """Splits dataset indices into ``num_partitions`` disjoint, covering parts."""

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        """Return one sorted int64 index array per partition; each index exactly once."""
        ...


def _as_label_array(labels: Labels) -> npt.NDArray[np.int64]:
    """Accept torch or numpy labels so callers need not convert; reject non-1-D input."""
    if isinstance(labels, torch.Tensor):
        array = labels.detach().cpu().numpy()
    else:
        array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(array.shape)}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_num_partitions(num_partitions: int, num_examples: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ValueError(f"cannot split {num_examples} examples into {num_partitions} non-empty partitions")


@dataclass(frozen=True)
class IidPartitioner:
    """Uniformly random, near-equal-size partitions: the no-heterogeneity baseline.

    One seeded permutation of all indices cut into ``num_partitions`` contiguous runs
    whose sizes differ by at most one (the first ``n % num_partitions`` are one larger).
    """

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        array = _as_label_array(labels)
        _check_num_partitions(num_partitions, array.size)
        permutation = _iid_permutation(array.size, seed)
        return [np.sort(part) for part in np.array_split(permutation, num_partitions)]

    def __str__(self) -> str:
        return "iid"


@dataclass(frozen=True)
class DirichletPartitioner:
    """Label skew as in Hsu et al. 2019: per class, shares over clients ~ Dir(alpha).

    Small ``alpha`` concentrates each class on few clients (strong non-IID); large
    ``alpha`` approaches IID. A draw that leaves some client with fewer than
    ``min_size`` examples is re-drawn, up to ``max_tries`` times, because an empty
    client cannot train and would silently change the number of participants.
    """

    alpha: float
    min_size: int = 1
    max_tries: int = 1000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"dirichlet alpha must be a positive finite float, got {self.alpha}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        array = _as_label_array(labels)
        _check_num_partitions(num_partitions, array.size)
        if self.min_size * num_partitions > array.size:
            raise ValueError(
                f"cannot give each of {num_partitions} partitions at least {self.min_size} of {array.size} examples"
            )
        rng = np.random.default_rng(seed)
        class_indices = [np.flatnonzero(array == c) for c in np.unique(array)]
        for _ in range(self.max_tries):
            parts: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_partitions)]
            for indices in class_indices:
                shuffled = rng.permutation(indices)
                shares = rng.dirichlet(np.full(num_partitions, self.alpha))
                # Cumulative shares -> cut points; rounding keeps every index exactly once.
                cuts = np.round(np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
                for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                    part.append(chunk)
            merged = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
            if min(m.size for m in merged) >= self.min_size:
                return merged
        raise ValueError(
            f"dirichlet:{self.alpha} gave some of {num_partitions} partitions fewer than "
            f"{self.min_size} examples in {self.max_tries} draws; use a larger alpha, "
            "fewer partitions or a smaller min_size"
        )

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}"


@dataclass(frozen=True)
class ShardsPartitioner:
    """Pathological label skew of McMahan et al. 2017 (FedAvg paper, Sec. 3, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", AISTATS): sort the examples by label, cut
    them into ``num_partitions * shards_per_client`` shards and give every client
    ``shards_per_client`` shards chosen at random, so with 2 shards most clients see only
    two labels (MNIST there: 200 shards of 300 examples, 2 per client for 100 clients).

    Shards are equal-size up to one example (``np.array_split`` of the label-sorted indices)
    so every index is used exactly once even when the count does not divide evenly; the
    order within a label is a seeded shuffle, so which examples of a label land in which
    shard also depends on the seed. Fewer examples than shards is an error.
    """

    shards_per_client: int

    def __post_init__(self) -> None:
        if isinstance(self.shards_per_client, bool) or not isinstance(self.shards_per_client, int):
            raise ValueError(f"shards per client must be an int, got {self.shards_per_client!r}")
        if self.shards_per_client < 1:
            raise ValueError(f"shards per client must be >= 1, got {self.shards_per_client}")

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        array = _as_label_array(labels)
        layout = self._layout(array, num_partitions, seed)
        return [layout.part(i) for i in range(num_partitions)]

    def _layout(self, array: npt.NDArray[np.int64], num_partitions: int, seed: int) -> _ShardLayout:
        _check_num_partitions(num_partitions, array.size)
        num_shards = num_partitions * self.shards_per_client
        if num_shards > array.size:
            raise ValueError(
                f"shards:{self.shards_per_client} over {num_partitions} partitions needs {num_shards} shards "
                f"but there are only {array.size} examples; use fewer shards per client or fewer partitions"
            )
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(array.size).astype(np.int64)
        # Stable sort by label after a random shuffle: grouped by label, random within a label.
        by_label = shuffled[np.argsort(array[shuffled], kind="stable")]
        assignment = rng.permutation(num_shards).astype(np.int64).reshape(num_partitions, self.shards_per_client)
        by_label.setflags(write=False)
        assignment.setflags(write=False)
        return _ShardLayout(by_label, assignment, num_shards)

    def __str__(self) -> str:
        return f"shards:{self.shards_per_client}"


@dataclass(frozen=True)
class _ShardLayout:
    """Label-sorted indices plus the shard ids each client holds: any client in O(K) slices."""

    by_label: npt.NDArray[np.int64]
    assignment: npt.NDArray[np.int64]  # [num_partitions, shards_per_client]
    num_shards: int

    def part(self, index: int) -> npt.NDArray[np.int64]:
        base, extra = divmod(self.by_label.size, self.num_shards)
        chunks = []
        for shard in self.assignment[index].tolist():
            start = shard * base + min(shard, extra)
            chunks.append(self.by_label[start : start + base + (1 if shard < extra else 0)])
        return np.sort(np.concatenate(chunks)).astype(np.int64, copy=False)


@dataclass(frozen=True)
class QuantityPartitioner:
    """Quantity skew: labels IID, client sizes lognormal. One of the non-IID settings surveyed
    by Kairouz et al. 2021 ("Advances and Open Problems in Federated Learning", Sec. 3.1,
    "quantity skew or unbalancedness") and benchmarked by Li et al. 2022 ("Federated Learning
    on Non-IID Data Silos: An Experimental Study", ICDE; there with Dirichlet sizes); the
    lognormal choice follows the client sizes of the LEAF / FedProx synthetic data (Li et al. 2020).

    Client weights are ``w_k ~ Lognormal(0, sigma)`` (drawn as ``exp(sigma * z)`` in log
    space, so a huge ``sigma`` cannot overflow), normalised to the dataset size: each client
    gets 1 example plus its share of the remaining ``n - num_partitions`` by the
    largest-remainder rule, so sizes are >= 1 and sum to ``n`` exactly. ``sigma = 0`` gives
    equal sizes (up to one). The indices are then one seeded permutation cut at those sizes.
    """

    sigma: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"quantity sigma must be a non-negative finite float, got {self.sigma}")

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        array = _as_label_array(labels)
        _check_num_partitions(num_partitions, array.size)
        permutation, offsets = _quantity_layout(array.size, num_partitions, self.sigma, seed)
        return [np.sort(permutation[offsets[i] : offsets[i + 1]]) for i in range(num_partitions)]

    def __str__(self) -> str:
        return f"quantity:{self.sigma:g}"


def quantity_sizes(
    num_examples: int, num_partitions: int, sigma: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Lognormal(0, sigma) client sizes, each >= 1, summing to ``num_examples`` (largest remainder)."""
    _check_num_partitions(num_partitions, num_examples)
    log_weights = sigma * rng.standard_normal(num_partitions)
    weights = np.exp(log_weights - log_weights.max())
    spare = num_examples - num_partitions
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    leftover = spare - int(sizes.sum())
    if leftover > 0:
        order = np.argsort(-(raw - sizes), kind="stable")
        sizes[order[:leftover]] += 1
    return sizes + 1


@functools.lru_cache(maxsize=4)
def _iid_permutation(num_examples: int, seed: int) -> npt.NDArray[np.int64]:
    """The seeded permutation behind ``iid`` (read-only; shared by split and the lazy path)."""
    permutation = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    permutation.setflags(write=False)
    return permutation


@functools.lru_cache(maxsize=4)
def _quantity_layout(
    num_examples: int, num_partitions: int, sigma: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(permutation, offsets) behind ``quantity:SIGMA``: client i holds ``perm[off[i]:off[i+1]]``."""
    rng = np.random.default_rng(seed)
    sizes = quantity_sizes(num_examples, num_partitions, sigma, rng)
    permutation = rng.permutation(num_examples).astype(np.int64)
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])
    permutation.setflags(write=False)
    offsets.setflags(write=False)
    return permutation, offsets


def parse_partitioner(spec: str) -> Partitioner:
    """Turn a CLI/config spec into a partitioner, failing loudly on anything unknown.

    Accepted: ``iid``, ``dirichlet:ALPHA`` (ALPHA > 0), ``shards:K`` (integer K >= 1),
    ``quantity:SIGMA`` (SIGMA >= 0).
    """
    text = spec.strip()
    if text == "iid":
        return IidPartitioner()
    kind, sep, arg = text.partition(":")
    if sep and kind in ("dirichlet", "quantity"):
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if kind == "dirichlet" and math.isfinite(value) and value > 0:
            return DirichletPartitioner(alpha=value)
        if kind == "quantity" and math.isfinite(value) and value >= 0:
            return QuantityPartitioner(sigma=value)
    if sep and kind == "shards" and arg.isdecimal() and int(arg) >= 1:
        return ShardsPartitioner(shards_per_client=int(arg))
    raise ValueError(f"unknown partitioner {spec!r}; expected {ACCEPTED_SPECS}")


_FULL_SPLIT_CACHE: OrderedDict[tuple[str, str, int, int], Any] = OrderedDict()
_FULL_SPLIT_CACHE_SIZE = 4
_FULL_SPLIT_LOCK = threading.Lock()


def _labels_digest(array: npt.NDArray[np.int64]) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def partition_indices(
    spec: str | Partitioner, labels: Labels, num_partitions: int, index: int, seed: int
) -> npt.NDArray[np.int64]:
    """Partition ``index`` of ``num_partitions`` alone; always equal to ``split(labels, num_partitions, seed)[index]``.

    Cost per spec, for ``n`` examples and ``P`` partitions (the work is cached, keyed by
    spec, ``n`` or the labels' hash, ``P`` and ``seed``, so a round touching many clients
    pays it once):

    - ``iid``: one read-only permutation of ``n`` (shared with ``IidPartitioner.split``)
      and arithmetic offsets -- O(n) memory, nothing per client.
    - ``quantity:SIGMA``: that permutation plus ``P + 1`` int64 offsets -- O(n + P) in
      two numpy arrays, no per-client Python objects.
    - ``shards:K``: the label-sorted indices and a ``P x K`` shard table -- O(n + P K) in two
      arrays; the labels are hashed (O(n)) on each call to find the cached layout.
    - ``dirichlet:ALPHA``: the full split is computed and cached (``P`` arrays): its
      re-draw-until-``min_size`` loop needs every client's size. Labels hashed per call.

    The returned array is a fresh, sorted int64 copy the caller may modify.
    """
    partitioner = parse_partitioner(spec) if isinstance(spec, str) else spec
    array = _as_label_array(labels)
    _check_num_partitions(num_partitions, array.size)
    if not 0 <= index < num_partitions:
        raise ValueError(f"partition index {index} out of range for {num_partitions} partitions")
    if isinstance(partitioner, IidPartitioner):
        base, extra = divmod(array.size, num_partitions)
        start = index * base + min(index, extra)
        stop = start + base + (1 if index < extra else 0)
        return np.sort(_iid_permutation(array.size, seed)[start:stop])
    if isinstance(partitioner, QuantityPartitioner):
        permutation, offsets = _quantity_layout(array.size, num_partitions, partitioner.sigma, seed)
        return np.sort(permutation[offsets[index] : offsets[index + 1]])
    key = (str(partitioner), _labels_digest(array), num_partitions, seed)
    with _FULL_SPLIT_LOCK:
        cached = _FULL_SPLIT_CACHE.get(key)
        if cached is not None:
            _FULL_SPLIT_CACHE.move_to_end(key)
    if cached is None:
        if isinstance(partitioner, ShardsPartitioner):
            cached = partitioner._layout(array, num_partitions, seed)
        else:
            cached = partitioner.split(array, num_partitions, seed)
        with _FULL_SPLIT_LOCK:
            _FULL_SPLIT_CACHE[key] = cached
            while len(_FULL_SPLIT_CACHE) > _FULL_SPLIT_CACHE_SIZE:
                _FULL_SPLIT_CACHE.popitem(last=False)
    if isinstance(cached, _ShardLayout):
        return cached.part(index)
    return np.array(cached[index], dtype=np.int64, copy=True)


def parse_partition_label(text: str) -> tuple[int, int]:
    """Parse ``"i/N"`` (this process holds partition i of N, 0-based) into ``(i, N)``."""
    index_text, sep, total_text = text.strip().partition("/")
    try:
        if not sep:
            raise ValueError
        index, total = int(index_text), int(total_text)
    except ValueError:
        raise ValueError(f"bad partition {text!r}; expected 'i/N' with integers 0 <= i < N, e.g. '2/4'") from None
    if total < 1 or not 0 <= index < total:
        raise ValueError(f"bad partition {text!r}; need N >= 1 and 0 <= i < N, got i={index}, N={total}")
    return index, total
