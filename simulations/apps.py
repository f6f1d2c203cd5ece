"""The app contract: how `leptonfl client`, `leptonfl run create` and `leptonfl sim` find a
model and data. An app is a Python module — a folder holding `app.py`, a `.py` file, or
an importable dotted name — that defines:

    NAME: str                                   the app name clients and runs are matched by
    build_model() -> torch.nn.Module            a fresh model (seeded by the caller)
    load_dataset() -> (train, test)             TensorDatasets, labels as the last tensor
    DEFAULT_CLIENT_CONFIG: dict (optional)      e.g. {"local_epochs": 1, "batch_size": 10, "lr": 0.05}
    make_optimizer(params, config) (optional)   default: SGD with config["lr"]
    loss_fn(outputs, targets) (optional)        default: cross-entropy

Partition `i` of `n` is the framework's: the training set split by a partitioner
(`iid`, `dirichlet:α`), the test set split IID, both from the same seed on every host.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from client_sdk.training import LossFn, OptimizerFactory, sgd
from simulations.partition import partition_indices

PARTITION_CACHE_SIZE = 4096
Rows = np.ndarray[Any, np.dtype[np.int64]]


class AppError(ValueError):
    """The app cannot be found or does not follow the contract."""


@dataclass(frozen=True)
class App:
    name: str
    module: ModuleType
    build_model: Callable[[], nn.Module]
    load_dataset: Callable[[], tuple[TensorDataset, TensorDataset]]
    default_config: Mapping[str, Any] = field(default_factory=dict)
    make_optimizer: OptimizerFactory = sgd
    loss_fn: LossFn = nn.functional.cross_entropy
    _partition_cache: dict[tuple[int, int, str, int], tuple[Subset, Subset]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _rows_cache: dict[tuple[int, int, str, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def initial_weights(self, seed: int) -> dict[str, torch.Tensor]:
        """The model's freshly initialised weights under `seed` (same on every host)."""
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in self.build_model().state_dict().items()}

    def partition(self, index: int, count: int, partitioner: str = "iid", seed: int = 0) -> tuple[Subset, Subset]:
        key = (index, count, partitioner, seed)
        cached = self._partition_cache.get(key)
        if cached is None:
            train_rows, test_rows = self.partition_rows(index, count, partitioner, seed)
            train, test = self.load_dataset()
            cached = (Subset(train, train_rows.tolist()), Subset(test, test_rows.tolist()))
            _remember(self._partition_cache, key, cached)
        return cached

    def partition_rows(
        self, index: int, count: int, partitioner: str = "iid", seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`partition`'s train and test shares as int64 tensors of rows of the base datasets.

        The simulation backends index the base tensors with these every round; converting the
        Subsets' Python lists each time cost more than the gathers themselves (and backends that
        only gather never build those lists). Read-only by convention: callers index with them
        and never write into them.
        """
        key = (index, count, partitioner, seed)
        cached = self._rows_cache.get(key)
        if cached is None:
            train_rows, test_rows = self._partition(index, count, partitioner, seed)
            cached = (torch.from_numpy(train_rows), torch.from_numpy(test_rows))
            _remember(self._rows_cache, key, cached)
        return cached

    def _partition(self, index: int, count: int, partitioner: str, seed: int) -> tuple[Rows, Rows]:
        """Client `index` of `count`: the rows of its train share (by `partitioner`) and of an IID
        test share, as fresh int64 arrays.

        Computed lazily for `iid` and `quantity:σ` (a cached permutation plus offsets), so a
        population of 100,000 clients costs memory only for the clients actually asked for.
        `natural` uses the app's own split (`natural_partition(index, count, seed)`).
        """
        if not 0 <= index < count:
            raise AppError(f"partition {index} does not exist among {count}")
        train, test = self.load_dataset()
        if partitioner == "natural":
            hook = getattr(self.module, "natural_partition", None)
            if hook is None:
                raise AppError(f"app {self.name!r} has no natural partition (define natural_partition)")
            train_idx, test_idx = hook(index, count, seed)
            return _int64_rows(train_idx), _int64_rows(test_idx)
        train_idx = partition_indices(partitioner, labels_of(train), count, index, seed)
        if len(test) >= count:
            test_idx = partition_indices("iid", labels_of(test), count, index, seed)
        else:  # too few test examples to share: everyone gets all
            test_idx = np.arange(len(test), dtype=np.int64)
        return train_idx, test_idx


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Insert into a per-client cache, bounded so that huge populations stay cheap (oldest out)."""
    if len(cache) >= PARTITION_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _int64_rows(indices: Any) -> Rows:
    """An app hook's indices (any sequence of integers) as a fresh int64 array."""
    return np.fromiter((int(i) for i in indices), dtype=np.int64)


def labels_of(dataset: TensorDataset) -> torch.Tensor:
    if not isinstance(dataset, TensorDataset):
        raise AppError("load_dataset() must return TensorDatasets with labels as the last tensor")
    return dataset.tensors[-1]


def loader(dataset: Subset | TensorDataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def load_app(spec: str) -> App:
    """Load an app from a folder with `app.py`, a `.py` file, or a dotted module name."""
    module = _import(spec)
    missing = [name for name in ("NAME", "build_model", "load_dataset") if not hasattr(module, name)]
    if missing:
        raise AppError(f"app {spec!r} lacks {', '.join(missing)} (see docs/apps.md for the contract)")
    return App(
        name=str(module.NAME),
        module=module,
        build_model=module.build_model,
        load_dataset=module.load_dataset,
        default_config=dict(getattr(module, "DEFAULT_CLIENT_CONFIG", {})),
        make_optimizer=getattr(module, "make_optimizer", sgd),
        loss_fn=getattr(module, "loss_fn", nn.functional.cross_entropy),
    )


def _import(spec: str) -> ModuleType:
    path = Path(spec)
    if path.is_dir():
        path = path / "app.py"
    if path.suffix == ".py":
        if not path.is_file():
            raise AppError(f"no app at {spec!r}: {path} does not exist")
        resolved = path.resolve()
        name = f"leptonfl_app_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, resolved)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise AppError(f"no app {spec!r}: not a folder, a .py file or an importable module ({exc})") from exc
