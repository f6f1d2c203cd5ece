"""In-process backend: virtual clients trained one after another in this process.

One model is built once and re-used: each client's start weights are copied into it in
place, its update is folded straight into the strategy's running aggregate, and nothing
is serialised. The strategy and the training functions are the daemon's and the SDK's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial

import torch

from client_sdk.training import evaluate_model, load_weights, snapshot, train_epochs
from simulations.apps import App, loader
from simulations.config import SimulationConfig
from simulations.report import RoundRecord
from strategies import ClientUpdate, create_strategy

Progress = Callable[[RoundRecord], None]


def client_seed(seed: int, round_: int, client: int) -> int:
    """Distinct, reproducible data-order seed per (simulation seed, round, client)."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63)


def run_inprocess(
    app: App, config: SimulationConfig, on_round: Progress
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    weights = app.initial_weights(config.seed)
    strategy = create_strategy(config.strategy, config.strategy_params)
    model = app.build_model()
    sampler = random.Random(config.seed)
    records: list[RoundRecord] = []
    for number in range(1, config.rounds + 1):
        started = time.perf_counter()
        selected = sorted(sampler.sample(range(config.clients), config.per_round))
        client_config = {**app.default_config, **config.client_config, **strategy.configure_round(number)}
        batch_size = int(client_config.get("batch_size", 32))
        epochs = int(client_config.get("local_epochs", 1))
        aggregate = strategy.begin_round(number, weights)
        for client in selected:
            train, _ = app.partition(client, config.clients, config.partition, config.seed)
            load_weights(model, weights)
            optimizer = app.make_optimizer(model.parameters(), client_config)
            data = loader(train, batch_size, True, client_seed(config.seed, number, client))
            mu = float(client_config.get("proximal_mu", 0.0))
            examples, loss = train_epochs(model, partial(iter, data), optimizer, epochs, app.loss_fn, mu)
            aggregate.add(ClientUpdate(snapshot(model), examples, {"train_loss": loss}))
        weights = strategy.finish_round(number, weights, aggregate)
        load_weights(model, weights)
        eval_examples, eval_loss, correct = 0, 0.0, 0.0
        for client in selected:
            _, test = app.partition(client, config.clients, config.partition, config.seed)
            result = evaluate_model(model, loader(test, 256, False, 0), app.loss_fn)
            eval_examples += result.num_examples
            eval_loss += result.loss * result.num_examples
            correct += result.metrics["accuracy"] * result.num_examples
        record = RoundRecord(
            round=number,
            num_clients=aggregate.num_updates,
            num_examples=aggregate.num_examples,
            train_loss=aggregate.metrics()["train_loss"],
            eval_loss=eval_loss / eval_examples,
            eval_accuracy=correct / eval_examples,
            duration_seconds=time.perf_counter() - started,
        )
        records.append(record)
        on_round(record)
    return records, weights
