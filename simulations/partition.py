"""Partitioners: split a labelled dataset's indices among virtual clients.

Federated results depend heavily on how data is spread over clients, so the split is
a named, parsed spec (``"iid"``, ``"dirichlet:0.5"``) recorded with every run, and it
is a pure function of (labels, number of partitions, seed): the same seed always gives
the same clients, which is what makes simulations reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

ACCEPTED_SPECS = '"iid" or "dirichlet:ALPHA" with ALPHA a positive float (e.g. "dirichlet:0.5")'

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
    """Uniformly random, near-equal-size partitions: the no-heterogeneity baseline."""

    def split(self, labels: Labels, num_partitions: int, seed: int) -> list[npt.NDArray[np.int64]]:
        array = _as_label_array(labels)
        _check_num_partitions(num_partitions, array.size)
        rng = np.random.default_rng(seed)
        permutation = rng.permutation(array.size).astype(np.int64)
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


def parse_partitioner(spec: str) -> Partitioner:
    """Turn a CLI/config spec into a partitioner, failing loudly on anything unknown."""
    text = spec.strip()
    if text == "iid":
        return IidPartitioner()
    kind, sep, arg = text.partition(":")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return DirichletPartitioner(alpha=alpha)
    raise ValueError(f"unknown partitioner {spec!r}; expected {ACCEPTED_SPECS}")


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
