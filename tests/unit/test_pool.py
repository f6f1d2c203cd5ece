"""Worker-pool messages: small tensors by value, large ones in shared memory, all intact."""

from __future__ import annotations

import pickle

import pytest
import torch

from simulations.pool import BY_VALUE_BYTES, _Pickler
from strategies import ClientUpdate
from strategies.fedavg import WeightedMean


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(128, 64),
        torch.randn(7, 5, dtype=torch.float64).t(),  # not contiguous
        torch.arange(10),
        torch.tensor([True, False, True]),
        torch.randn(4, 3).to(torch.bfloat16),
        torch.tensor(3.5),  # 0-dim
        torch.empty(0, 4),
        torch.randn(3, 2, dtype=torch.complex64).conj(),
    ],
    ids=lambda t: f"{t.dtype}{list(t.shape)}",
)
def test_small_tensors_round_trip_by_value(tensor: torch.Tensor) -> None:
    data = bytes(_Pickler.dumps({"t": tensor}))
    back = pickle.loads(data)["t"]
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor.resolve_conj())
    assert not back.is_shared()


def test_large_tensors_still_go_through_shared_memory() -> None:
    big = torch.randn(BY_VALUE_BYTES // 4 + 1)
    data = _Pickler.dumps(big)
    assert len(data) < 10_000  # a handle, not the bytes
    assert big.is_shared()


def test_a_partial_aggregate_survives_the_trip() -> None:
    weights = {"w": torch.randn(3, 2), "n": torch.tensor(4)}
    aggregate = WeightedMean(weights)
    aggregate.add(ClientUpdate({"w": torch.ones(3, 2), "n": torch.tensor(2)}, 5, {"train_loss": 0.5}))
    back = pickle.loads(bytes(_Pickler.dumps(aggregate)))
    assert isinstance(back, WeightedMean) and back.num_examples == 5
    assert all(torch.equal(a, b) for a, b in zip(aggregate.result().values(), back.result().values(), strict=True))
    assert back.metrics() == aggregate.metrics()
