"""The in-process backend's per-client shortcuts change nothing: same batches as the DataLoader,
same weights as a fresh optimizer and `state_dict()` every client."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from client_sdk.training import sgd
from simulations.apps import App, load_app, loader
from simulations.batching import EpochOrders, epoch_batches
from simulations.config import SimulationConfig
from simulations.inprocess import LocalSettings, LocalTrainer
from tests.conftest import DIGITS_APP


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path) -> SimulationConfig:
    return SimulationConfig(app=DIGITS_APP, clients=12, rounds=1, partition="dirichlet:0.5", seed=3, out=tmp_path)


@pytest.mark.parametrize(("client", "batch_size", "epochs"), [(0, 10, 1), (5, 7, 3), (11, 1000, 2)])
@pytest.mark.parametrize("with_rows", [True, False])
def test_epoch_batches_are_the_dataloaders(client: int, batch_size: int, epochs: int, with_rows: bool) -> None:
    app = load_app(DIGITS_APP)
    train, _ = app.partition(client, 12, "dirichlet:0.5", 3)
    rows = app.partition_rows(client, 12, "dirichlet:0.5", 3)[0] if with_rows else None
    fast = epoch_batches(train, batch_size, 99, epochs, rows)
    reference = loader(train, batch_size, True, 99)
    for _ in range(epochs):
        got, expected = list(fast()), list(reference)
        assert len(got) == len(expected)
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)


def test_clients_prepared_together_on_one_generator_get_their_own_dataloaders_batches() -> None:
    """`LocalTrainer.fold` prepares several clients (epoch 1 gathered, one re-seeded generator)
    before training any: each must still see exactly its own DataLoader's batches, every epoch."""
    app = load_app(DIGITS_APP)
    draw = EpochOrders()
    clients = [(c, 100 + c) for c in (0, 4, 9)]
    prepared = [
        epoch_batches(app.partition(c, 12, "dirichlet:0.5", 3)[0], 8, seed, 2, draw=draw) for c, seed in clients
    ]
    references = [loader(app.partition(c, 12, "dirichlet:0.5", 3)[0], 8, True, seed) for c, seed in clients]
    for _ in range(2):
        for fast, reference in zip(prepared, references, strict=True):
            got, expected = list(fast()), list(reference)
            assert len(got) == len(expected) > 1
            assert all(
                torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(got, expected, strict=True)
            )


def test_partition_rows_are_the_partitions_indices() -> None:
    app = load_app(DIGITS_APP)
    train, test = app.partition(4, 12, "iid", 1)
    rows, test_rows = app.partition_rows(4, 12, "iid", 1)
    assert rows.dtype == test_rows.dtype == torch.long
    assert rows.tolist() == list(train.indices) and test_rows.tolist() == list(test.indices)
    assert app.partition_rows(4, 12, "iid", 1)[0] is rows  # cached


def _fresh_each_time(app: App) -> App:
    """The same SGD, built by a factory the trainer does not recognise: a new optimizer per client."""

    def make_optimizer(params: Any, config: Mapping[str, Any]) -> torch.optim.Optimizer:
        return sgd(params, config)

    return App(app.name, app.module, app.build_model, app.load_dataset, app.default_config, make_optimizer)


@pytest.mark.parametrize("client_config", [{"momentum": 0.9}, {"momentum": 0.0, "proximal_mu": 0.1}], ids=str)
def test_reused_optimizer_and_live_tensors_give_bit_identical_updates(
    tmp_path: Path, client_config: dict[str, float]
) -> None:
    app, config = load_app(DIGITS_APP), _config(tmp_path)
    settings = {**app.default_config, "local_epochs": 2, "lr": 0.1, **client_config}
    weights = app.initial_weights(config.seed)
    fast = LocalTrainer(app, config, app.build_model())
    slow = LocalTrainer(_fresh_each_time(app), config, app.build_model())
    slow._live = None  # state_dict() on every load and snapshot, as the SDK does
    for client in (0, 3, 7):  # one after another: momentum buffers must not leak from one to the next
        a = fast.train_client(weights, client, 1, settings)
        b = slow.train_client(weights, client, 1, settings)
        assert a.num_examples == b.num_examples and a.metrics == b.metrics
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in weights)
    assert fast.optimizer(LocalSettings.of(settings)) is fast.optimizer(LocalSettings.of(settings))
    assert fast.optimizer(LocalSettings.of({**settings, "lr": 0.2})).param_groups[0]["lr"] == 0.2


def test_snapshots_are_copies(tmp_path: Path) -> None:
    app, config = load_app(DIGITS_APP), _config(tmp_path)
    trainer = LocalTrainer(app, config, app.build_model())
    first = trainer.train_client(app.initial_weights(0), 0, 1, {"lr": 0.1, "batch_size": 10})
    kept = {k: t.clone() for k, t in first.weights.items()}
    trainer.train_client(app.initial_weights(1), 1, 1, {"lr": 0.1, "batch_size": 10})
    assert all(torch.equal(kept[k], first.weights[k]) for k in kept)  # an aggregate may keep updates
    with pytest.raises(ValueError, match="do not fit"):
        trainer.load({"0.weight": torch.zeros(128, 64)})


def test_models_with_buffers_go_through_state_dict(tmp_path: Path) -> None:
    app, config = load_app(DIGITS_APP), _config(tmp_path)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    trainer = LocalTrainer(app, config, model)
    assert trainer._live is None
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    update = trainer.train_client(weights, 2, 1, {"lr": 0.1, "batch_size": 10})
    assert update.weights.keys() == weights.keys()
    assert not torch.equal(update.weights["1.running_mean"], weights["1.running_mean"])
    with pytest.raises(ValueError, match="do not fit"):
        trainer.load({"nope": torch.zeros(1)})
