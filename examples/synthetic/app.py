"""Synthetic(1,1) of the FedProx paper (Li et al. 2020) with multinomial logistic regression.

30 natural clients, each with its own labelling rule ``argmax(W_k x + b_k)`` and feature
mean ``v_k`` (see ``simulations.datasets.synthetic_fedprox``), generated in memory from a
fixed seed: no download, identical on every host.

App contract: ``NAME``, ``DEFAULT_CLIENT_CONFIG``, ``build_model()``, ``load_dataset()``,
plus the optional ``natural_partition(index, count, seed)`` hook, which gives client ``k``
exactly the data generated for client ``k``. ``load_dataset()`` alone (with the
framework's ``iid`` / ``dirichlet:α`` / ``shards:K`` / ``quantity:σ`` partitioners) pools
the 30 clients' data and re-splits it, which destroys the natural heterogeneity.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import TensorDataset

from simulations.datasets import synthetic_fedprox

NAME = "synthetic"

# The FedProx paper's settings for its synthetic data: SGD, lr 0.01, batch 10 (it runs 20
# local epochs; one keeps a round cheap here, raise it with --set local_epochs=20).
DEFAULT_CLIENT_CONFIG: dict[str, float | int] = {"local_epochs": 1, "batch_size": 10, "lr": 0.01}

ALPHA = 1.0
BETA = 1.0
NATURAL_CLIENTS = 30
DATA_SEED = 0
NUM_FEATURES = 60
NUM_CLASSES = 10
TRAIN_FRACTION = 0.8

_DATASET: tuple[TensorDataset, TensorDataset] | None = None
# Client k's rows: train[_TRAIN_OFFSETS[k]:_TRAIN_OFFSETS[k + 1]], same for test.
_TRAIN_OFFSETS: npt.NDArray[np.int64] | None = None
_TEST_OFFSETS: npt.NDArray[np.int64] | None = None


def build_model() -> nn.Module:
    """Multinomial logistic regression 60 -> 10 (logits; the loss applies the softmax)."""
    return nn.Linear(NUM_FEATURES, NUM_CLASSES)


def load_dataset() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) ``TensorDataset(x float32 [N, 60], y int64 [N])``, cached.

    Each of the 30 clients' examples are split 80/20 (first ``floor(0.8 n_k)`` to train,
    the rest to test; examples are i.i.d. within a client) and concatenated in client
    order, so client ``k``'s rows are contiguous in both sets.
    """
    global _DATASET, _TRAIN_OFFSETS, _TEST_OFFSETS
    if _DATASET is None:
        clients = synthetic_fedprox(ALPHA, BETA, NATURAL_CLIENTS, DATA_SEED, dim=NUM_FEATURES, num_classes=NUM_CLASSES)
        cuts = [int(TRAIN_FRACTION * len(y)) for _, y in clients]
        train_x = torch.cat([x[:cut] for (x, _), cut in zip(clients, cuts, strict=True)])
        train_y = torch.cat([y[:cut] for (_, y), cut in zip(clients, cuts, strict=True)])
        test_x = torch.cat([x[cut:] for (x, _), cut in zip(clients, cuts, strict=True)])
        test_y = torch.cat([y[cut:] for (_, y), cut in zip(clients, cuts, strict=True)])
        train_sizes = np.array(cuts, dtype=np.int64)
        test_sizes = np.array([len(y) for _, y in clients], dtype=np.int64) - train_sizes
        _TRAIN_OFFSETS = np.concatenate([[0], np.cumsum(train_sizes)]).astype(np.int64)
        _TEST_OFFSETS = np.concatenate([[0], np.cumsum(test_sizes)]).astype(np.int64)
        _DATASET = (TensorDataset(train_x, train_y), TensorDataset(test_x, test_y))
    return _DATASET


def natural_partition(index: int, count: int, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Client ``index``'s own generated data: (train indices, test indices) into ``load_dataset()``.

    Only defined for ``count == NATURAL_CLIENTS`` (30): the data were generated per client,
    so there is no natural way to make more or fewer clients (use a partitioner for that).
    ``seed`` is accepted for the hook's signature and ignored: the data come from the fixed
    ``DATA_SEED``, so the partition is the same for every simulation seed.
    """
    del seed
    if count != NATURAL_CLIENTS:
        raise ValueError(
            f"the natural partition of {NAME!r} has exactly {NATURAL_CLIENTS} clients, not {count}; "
            "run with that many clients or use a partitioner such as iid or dirichlet:ALPHA"
        )
    if not 0 <= index < count:
        raise ValueError(f"partition {index} does not exist among {count}")
    load_dataset()
    assert _TRAIN_OFFSETS is not None and _TEST_OFFSETS is not None
    train = np.arange(_TRAIN_OFFSETS[index], _TRAIN_OFFSETS[index + 1], dtype=np.int64)
    test = np.arange(_TEST_OFFSETS[index], _TEST_OFFSETS[index + 1], dtype=np.int64)
    return train, test
