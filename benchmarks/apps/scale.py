"""Benchmark app for W3 (scale): a synthetic 10-class task big enough for 10,000 clients.

100,000 train / 20,000 test examples of dimension 20, generated deterministically in
memory (no download): ``x ~ N(0, I)``, ``y = argmax(x W + b)`` for a fixed random
``W`` (20 x 10) and ``b``, so a small MLP can learn it. Split IID over 10,000 clients,
each client holds 10 train and 2 test examples (digits has only 1,437 train examples,
which would leave most of 10,000 partitions empty).

App contract: ``NAME``, ``DEFAULT_CLIENT_CONFIG``, ``build_model()``, ``load_dataset()``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

NAME = "bench-scale"

DEFAULT_CLIENT_CONFIG: dict[str, float | int] = {"local_epochs": 1, "batch_size": 10, "lr": 0.05}

NUM_FEATURES = 20
NUM_CLASSES = 10
HIDDEN = 32
NUM_TRAIN = 100_000
NUM_TEST = 20_000
DATA_SEED = 0

_DATASET: tuple[TensorDataset, TensorDataset] | None = None


def build_model() -> nn.Module:
    """MLP 20-32-10 (~1k parameters): orchestration, not compute, is what W3 measures."""
    return nn.Sequential(nn.Linear(NUM_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES))


def load_dataset() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) ``TensorDataset(x float32 [N, 20], y int64 [N])``; cached, same in every process."""
    global _DATASET
    if _DATASET is None:
        generator = torch.Generator().manual_seed(DATA_SEED)
        rule = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
        bias = torch.randn(NUM_CLASSES, generator=generator)
        x = torch.randn(NUM_TRAIN + NUM_TEST, NUM_FEATURES, generator=generator)
        y = (x @ rule + bias).argmax(dim=1)
        _DATASET = (
            TensorDataset(x[:NUM_TRAIN].clone(), y[:NUM_TRAIN].clone()),
            TensorDataset(x[NUM_TRAIN:].clone(), y[NUM_TRAIN:].clone()),
        )
    return _DATASET
