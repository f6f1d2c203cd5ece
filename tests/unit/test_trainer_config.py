"""`TorchTrainer` applies the run's `batch_size` like the simulation backends do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from client_sdk import TorchTrainer
from client_sdk.training import snapshot

DATA = TensorDataset(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2)


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure: Any = None) -> Any:
        CountingSGD.steps += 1
        return super().step(closure)


def counting(params: Iterable[nn.Parameter], config: Mapping[str, Any]) -> torch.optim.Optimizer:
    return CountingSGD(params, lr=0.1)


def steps_of(loader: DataLoader[Any], config: dict[str, Any]) -> int:
    model = nn.Linear(3, 2)
    trainer = TorchTrainer(model, loader, optimizer=counting)
    CountingSGD.steps = 0
    result = trainer.fit(snapshot(model), config)
    assert result.num_examples == 40
    return CountingSGD.steps


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        ({}, 2),
        ({"batch_size": 32}, 2),
        ({"batch_size": 10}, 4),
        ({"batch_size": 7}, 6),
        ({"batch_size": 7, "local_epochs": 2}, 12),
    ],
)
def test_the_run_batch_size_sets_the_steps_per_epoch(config, steps):
    assert (
        steps_of(DataLoader(DATA, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)), config)
        == steps
    )


def test_rebatching_keeps_the_apps_shuffling_stream():
    """Batch size 10 over a loader seeded with 1 trains exactly as a loader built with 10 and seed 1."""

    def trained(loader: DataLoader[Any], config: dict[str, Any]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return TorchTrainer(model, loader).fit(snapshot(model), config).weights

    rebatched = trained(
        DataLoader(DATA, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)), {"batch_size": 10}
    )
    native = trained(DataLoader(DATA, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(1)), {})
    assert all(torch.equal(rebatched[k], native[k]) for k in native)


def test_a_custom_sampler_keeps_its_batches():
    sampler = WeightedRandomSampler([1.0] * 40, num_samples=40, generator=torch.Generator().manual_seed(2))
    assert steps_of(DataLoader(DATA, batch_size=20, sampler=sampler), {"batch_size": 10}) == 2


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        steps_of(DataLoader(DATA, batch_size=8), {"batch_size": 0})
