"""In-process backend: virtual clients trained in this process, or in one worker process per
core (`SimulationConfig.workers`), never serialising a model to bytes.

Each process builds the model once and re-uses it: a client's start weights are copied into
it in place and its update is folded straight into the strategy's running aggregate. With
workers, each folds its share of the round's clients into a partial aggregate, and the
partials are merged once per round. The strategy (and central DP, sampling and accounting)
and the training functions are the daemon's and the SDK's own.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import TensorDataset

from client_sdk.training import evaluate_model, load_weights, snapshot, train_epochs
from simulations.apps import App, loader
from simulations.batching import epoch_batches
from simulations.config import SimulationConfig
from simulations.report import RoundRecord
from strategies import ClientUpdate, RoundAggregate
from strategies.accounting import PrivacyLedger
from strategies.factory import build_strategy, epsilon_over_budget

Progress = Callable[[RoundRecord], None]


class Pool(Protocol):
    """Trains shares of a round's clients elsewhere: worker processes (`simulations.pool.WorkerPool`)
    or Ray actors (`simulations.ray_backend.RayPool`)."""

    def train(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        client_config: Mapping[str, Any],
    ) -> list[tuple[RoundAggregate, list[float]]]: ...

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]: ...

    def close(self) -> None: ...


# (app, config, worker_count) -> Pool; given to `run_inprocess`, it replaces the worker processes.
PoolFactory = Callable[[App, SimulationConfig, int], Pool]


def client_seed(seed: int, round_: int, client: int) -> int:
    """Distinct, reproducible data-order seed per (simulation seed, round, client)."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63)


def train_client(
    app: App,
    config: SimulationConfig,
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    client: int,
    number: int,
    client_config: Mapping[str, Any],
) -> ClientUpdate:
    """One virtual client's local training from `weights`, as `TorchTrainer.fit` would do it."""
    train, _ = app.partition(client, config.clients, config.partition, config.seed)
    load_weights(model, weights)
    optimizer = app.make_optimizer(model.parameters(), client_config)
    epochs = int(client_config.get("local_epochs", 1))
    seed = client_seed(config.seed, number, client)
    batches = epoch_batches(train, int(client_config.get("batch_size", 32)), seed, epochs)
    mu = float(client_config.get("proximal_mu", 0.0))
    examples, loss = train_epochs(model, batches, optimizer, epochs, app.loss_fn, mu)
    return ClientUpdate(snapshot(model), examples, {"train_loss": loss})


def fold_clients(
    app: App,
    config: SimulationConfig,
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    clients: Sequence[int],
    number: int,
    client_config: Mapping[str, Any],
    aggregate: RoundAggregate,
) -> list[float]:
    """Train `clients` one after another into `aggregate`; returns each client's seconds."""
    seconds = []
    for client in clients:
        started = time.perf_counter()
        aggregate.add(train_client(app, config, model, weights, client, number, client_config))
        seconds.append(time.perf_counter() - started)
    return seconds


def train_share(
    app: App,
    config: SimulationConfig,
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    template: RoundAggregate,
    clients: Sequence[int],
    number: int,
    client_config: Mapping[str, Any],
) -> tuple[RoundAggregate, list[float]]:
    """A pool member's part of a round: its clients folded into a private copy of the round's
    empty aggregate (the template may arrive in memory shared with other members)."""
    aggregate = copy.deepcopy(template)
    seconds = fold_clients(app, config, model, weights, clients, number, client_config, aggregate)
    return aggregate, seconds


EVAL_CHUNK = 8192


@torch.no_grad()
def evaluation_sums(
    app: App,
    config: SimulationConfig,
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    clients: Sequence[int],
) -> tuple[int, float, float]:
    """(examples, loss sum, correct) of `weights` on the clients' test shares: a few large forward
    passes over all their rows at once when the test set is a TensorDataset, else a loader each."""
    if not clients:
        return 0, 0.0, 0.0
    shares = [app.partition(client, config.clients, config.partition, config.seed)[1] for client in clients]
    load_weights(model, weights)
    base = shares[0].dataset
    if not (isinstance(base, TensorDataset) and len(base.tensors) == 2 and all(len(s) for s in shares)):
        examples, loss_sum, correct = 0, 0.0, 0.0
        for share in shares:
            result = evaluate_model(model, loader(share, 256, False, 0), app.loss_fn)
            examples += result.num_examples
            loss_sum += result.loss * result.num_examples
            correct += result.metrics["accuracy"] * result.num_examples
        return examples, loss_sum, correct
    index = torch.cat([torch.as_tensor(list(share.indices), dtype=torch.long) for share in shares])
    inputs, targets = base.tensors
    model.eval()
    loss_sum, hits = 0.0, 0
    for start in range(0, len(index), EVAL_CHUNK):
        chunk = index[start : start + EVAL_CHUNK]
        outputs, labels = model(inputs[chunk]), targets[chunk]
        # the app's loss, per example: mean over the chunk times its size
        loss_sum += float(app.loss_fn(outputs, labels)) * len(chunk)
        if outputs.dim() == 2 and not labels.is_floating_point():
            hits += int((outputs.argmax(dim=1) == labels).sum())
    model.train()
    return len(index), loss_sum, float(hits)


def _evaluate(
    app: App, config: SimulationConfig, model: torch.nn.Module, weights: dict[str, torch.Tensor], clients: list[int]
) -> tuple[float, float]:
    """Federated evaluation of the new global model on the round's clients' test shares."""
    examples, loss_sum, correct = evaluation_sums(app, config, model, weights, clients)
    return (loss_sum / examples, correct / examples) if examples else (math.nan, math.nan)


def run_inprocess(
    app: App,
    config: SimulationConfig,
    on_round: Progress,
    echo: Callable[[str], None] = lambda _: None,
    pool_factory: PoolFactory | None = None,
    *,
    on_client: Callable[[float], None] | None = None,
    on_round_start: Callable[[int, int], None] | None = None,
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    """The round loop. With `pool_factory` (e.g. the Ray backend's), rounds whose aggregate is
    mergeable train on the pool it makes, whatever `config.workers` says."""
    from simulations.pool import WorkerPool

    workers = config.worker_count()
    pool: Pool | None = None
    privacy = config.privacy
    weights = app.initial_weights(config.seed)
    strategy = build_strategy(config.strategy, config.strategy_params, privacy, config.per_round, seed=config.seed)
    ledger = PrivacyLedger(privacy.accountant, delta=privacy.delta) if privacy.enabled else None
    sample_rate = config.per_round / config.clients
    model = app.build_model()
    sampler = random.Random(config.seed)
    records: list[RoundRecord] = []
    # Many small models: a second intra-op thread costs more than it gives (and fights the
    # workers for cores); parallelism comes from worker processes instead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for number in range(1, config.rounds + 1):
            started = time.perf_counter()
            if ledger is not None:
                # Poisson sampling with q = K / N, as the accountant assumes (and as the daemon does).
                upcoming = epsilon_over_budget(privacy, ledger, sample_rate)
                if upcoming is not None:
                    budget = privacy.epsilon_budget
                    echo(f"budget exhausted: round {number} would take epsilon to {upcoming:.4f}, above {budget:g}")
                    break
                selected = [c for c in range(config.clients) if sampler.random() < sample_rate]
            else:
                selected = sorted(sampler.sample(range(config.clients), config.per_round))
            if on_round_start is not None:
                on_round_start(number, len(selected))
            client_config = {**app.default_config, **config.client_config, **strategy.configure_round(number)}
            clip_norm = getattr(strategy, "clip_norm", None)
            aggregate = strategy.begin_round(number, weights)
            if pool is None and pool_factory is not None and aggregate.mergeable:
                pool = pool_factory(app, config, workers)
            elif pool is None and workers > 1 and aggregate.mergeable:
                pool = WorkerPool(app, config, workers)
                echo(f"training on {workers} worker processes")
            parallel = pool is not None and aggregate.mergeable and len(selected) > 1
            client_seconds: list[float] = []
            if parallel:
                assert pool is not None
                for partial_aggregate, times in pool.train(number, weights, aggregate, selected, client_config):
                    aggregate.merge(partial_aggregate)
                    client_seconds += times
            else:
                client_seconds = fold_clients(app, config, model, weights, selected, number, client_config, aggregate)
            if on_client is not None:
                for seconds in client_seconds:
                    on_client(seconds)
            weights = strategy.finish_round(number, weights, aggregate)
            extra: dict[str, float] = {}
            if ledger is not None:
                ledger.record_round(privacy.noise_multiplier, sample_rate)
                extra = {"epsilon": ledger.epsilon(), "clip_norm": float(clip_norm or math.nan)}
            if parallel:
                assert pool is not None
                examples, loss_sum, correct = pool.evaluate(weights, selected)
                eval_loss, eval_accuracy = (loss_sum / examples, correct / examples) if examples else (math.nan,) * 2
            else:
                eval_loss, eval_accuracy = _evaluate(app, config, model, weights, selected)
            record = RoundRecord(
                round=number,
                num_clients=aggregate.num_updates,
                num_examples=aggregate.num_examples,
                train_loss=aggregate.metrics().get("train_loss", math.nan),
                eval_loss=eval_loss,
                eval_accuracy=eval_accuracy,
                duration_seconds=time.perf_counter() - started,
                extra=extra,
                client_seconds=client_seconds,
            )
            records.append(record)
            on_round(record)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.close()
    return records, weights
