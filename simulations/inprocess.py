"""In-process backend: virtual clients trained in this process, or in one worker process per
core (`SimulationConfig.workers`), never serialising a model to bytes.

Each process builds the model once and re-uses it: a client's start weights are copied into
it in place and its update is folded straight into the strategy's running aggregate. With
workers, each folds its share of the round's clients into a partial aggregate, and the
partials are merged once per round. The strategy (and central DP, sampling and accounting)
and the training functions are the daemon's and the SDK's own.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import Subset, TensorDataset

from client_sdk.training import evaluate_model, load_weights, sgd, snapshot, train_epochs
from simulations.apps import App, loader
from simulations.batching import Batches, EpochOrders, epoch_batches
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


# Clients whose first epoch of data is gathered before any of them trains (`LocalTrainer.fold`).
PREPARE_AHEAD = 16


def client_seed(seed: int, round_: int, client: int) -> int:
    """Distinct, reproducible data-order seed per (simulation seed, round, client)."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63)


@dataclass(frozen=True)
class LocalSettings:
    """What a round's client config says about local training, read once per round rather than
    once per client (the SDK's defaults: one epoch, batches of 32, no FedProx term)."""

    config: Mapping[str, Any]
    epochs: int
    batch_size: int
    mu: float
    optimizer_key: Any  # identifies an optimizer built from `config`; None: never reuse one

    @classmethod
    def of(cls, client_config: Mapping[str, Any]) -> LocalSettings:
        return cls(
            client_config,
            int(client_config.get("local_epochs", 1)),
            int(client_config.get("batch_size", 32)),
            float(client_config.get("proximal_mu", 0.0)),
            _config_key(client_config),
        )


class LocalTrainer:
    """Trains virtual clients one after another on one model: a process's, a worker's or an actor's.

    The model is built once and every client's start weights are copied into it in place. What
    stays the same from client to client is set up once, not per client: the model's live
    tensors (when they are exactly its parameters, so that loading weights and taking a
    snapshot skip `state_dict()`), and, with the SDK's default `sgd`, the optimizer itself:
    its state is cleared before each client, and an SGD with empty state is a fresh one.
    Each client still trains through the SDK's `train_epochs`, as a real client does.
    """

    def __init__(self, app: App, config: SimulationConfig, model: torch.nn.Module) -> None:
        self.app, self.config, self.model = app, config, model
        self._live = _live_parameters(model)
        self._optimizer: tuple[Any, torch.optim.Optimizer] | None = None
        self._draw = EpochOrders()

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        """`load_weights`, minus its `state_dict()` walk when the live tensors are known."""
        if self._live is None or weights.keys() != self._live.keys():
            load_weights(self.model, weights)  # also the one place a mismatch is reported
            return
        with torch.no_grad():
            for name, tensor in self._live.items():
                tensor.copy_(weights[name])

    def snapshot(self) -> dict[str, torch.Tensor]:
        """`snapshot`: a copy of the weights the aggregate may keep (some strategies hold every update)."""
        if self._live is None:
            return snapshot(self.model)
        return {name: tensor.clone() for name, tensor in self._live.items()}

    def optimizer(self, settings: LocalSettings) -> torch.optim.Optimizer:
        """A fresh optimizer for one client; with the default `sgd`, the previous one, state cleared."""
        if self.app.make_optimizer is not sgd:
            return self.app.make_optimizer(self.model.parameters(), settings.config)
        key = settings.optimizer_key
        if self._optimizer is None or key is None or self._optimizer[0] != key:
            self._optimizer = (key, sgd(self.model.parameters(), settings.config))
        optimizer = self._optimizer[1]
        optimizer.state.clear()  # SGD's only state: momentum buffers
        return optimizer

    def train_client(
        self, weights: Mapping[str, torch.Tensor], client: int, number: int, client_config: Mapping[str, Any]
    ) -> ClientUpdate:
        """One virtual client's local training from `weights`, as `TorchTrainer.fit` would do it."""
        return self._train(weights, client, number, LocalSettings.of(client_config))

    def _batches(self, client: int, number: int, settings: LocalSettings) -> Callable[[], Batches]:
        """The client's batches this round (epoch 1 gathered now), in its DataLoader's order."""
        app, config = self.app, self.config
        train, _ = app.partition(client, config.clients, config.partition, config.seed)
        rows, _ = app.partition_rows(client, config.clients, config.partition, config.seed)
        seed = client_seed(config.seed, number, client)
        return epoch_batches(train, settings.batch_size, seed, settings.epochs, rows, self._draw)

    def _train(
        self,
        weights: Mapping[str, torch.Tensor],
        client: int,
        number: int,
        settings: LocalSettings,
        batches: Callable[[], Batches] | None = None,
    ) -> ClientUpdate:
        self.load(weights)
        optimizer = self.optimizer(settings)
        batches = batches or self._batches(client, number, settings)
        examples, loss = train_epochs(self.model, batches, optimizer, settings.epochs, self.app.loss_fn, settings.mu)
        return ClientUpdate(self.snapshot(), examples, {"train_loss": loss})

    def fold(
        self,
        weights: Mapping[str, torch.Tensor],
        clients: Sequence[int],
        number: int,
        client_config: Mapping[str, Any],
        aggregate: RoundAggregate,
    ) -> list[float]:
        """Train `clients` one after another into `aggregate`; returns each client's seconds."""
        settings = LocalSettings.of(client_config)  # the round's: the same for all its clients
        seconds = []
        for start in range(0, len(clients), PREPARE_AHEAD):
            # A few clients' data gathered, then those clients trained: on W1 this took ~10 %
            # less time per client than gathering each one's batches right before its training.
            chunk = clients[start : start + PREPARE_AHEAD]
            started = time.perf_counter()
            prepared = [self._batches(client, number, settings) for client in chunk]
            preparing = (time.perf_counter() - started) / len(chunk)
            for client, batches in zip(chunk, prepared, strict=True):
                started = time.perf_counter()
                aggregate.add(self._train(weights, client, number, settings, batches))
                seconds.append(preparing + time.perf_counter() - started)
        return seconds

    def share(
        self,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        number: int,
        client_config: Mapping[str, Any],
    ) -> tuple[RoundAggregate, list[float]]:
        """A pool member's part of a round: its clients folded into a private copy of the round's
        empty aggregate (the template may arrive in memory shared with other members)."""
        aggregate = copy.deepcopy(template)
        return aggregate, self.fold(weights, clients, number, client_config, aggregate)

    @torch.no_grad()
    def evaluation_sums(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        """(examples, loss sum, correct) of `weights` on the clients' test shares: a few large forward
        passes over all their rows at once when the test set is a TensorDataset, else a loader each."""
        if not clients:
            return 0, 0.0, 0.0
        app, config = self.app, self.config
        rows = [app.partition_rows(client, config.clients, config.partition, config.seed)[1] for client in clients]
        self.load(weights)
        base = app.load_dataset()[1]  # what every test share is a Subset of
        if not (isinstance(base, TensorDataset) and len(base.tensors) == 2 and all(len(r) for r in rows)):
            return self._evaluate_each(
                [app.partition(client, config.clients, config.partition, config.seed)[1] for client in clients]
            )
        index = torch.cat(rows)
        inputs, targets = base.tensors
        model = self.model
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

    def _evaluate_each(self, shares: Sequence[Subset]) -> tuple[int, float, float]:
        """The general path: the SDK's `evaluate_model` over a loader of each share."""
        examples, loss_sum, correct = 0, 0.0, 0.0
        for share in shares:
            result = evaluate_model(self.model, loader(share, 256, False, 0), self.app.loss_fn)
            examples += result.num_examples
            loss_sum += result.loss * result.num_examples
            correct += result.metrics["accuracy"] * result.num_examples
        return examples, loss_sum, correct


def _live_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's state as live, detached views of its parameters, or None when its state_dict
    is anything else (buffers, which a module may replace in `forward`, or state-dict hooks):
    then every load and snapshot goes through `state_dict()`, as the SDK does."""
    params = dict(model.named_parameters())
    state = model.state_dict()
    if list(state) != list(params) or any(
        t.data_ptr() != params[n].data_ptr() or t.shape != params[n].shape for n, t in state.items()
    ):
        return None
    return {name: p.detach() for name, p in params.items()}


def _config_key(client_config: Mapping[str, Any]) -> Any:
    """What identifies an optimizer built from `client_config` (None: not hashable, never reused)."""
    try:
        key = frozenset(client_config.items())
        hash(key)
    except TypeError:
        return None
    return key


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
    return LocalTrainer(app, config, model).share(weights, template, clients, number, client_config)


EVAL_CHUNK = 8192


def evaluation_sums(
    app: App,
    config: SimulationConfig,
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    clients: Sequence[int],
) -> tuple[int, float, float]:
    """`LocalTrainer.evaluation_sums` on `model`, for callers that keep a model only (Ray actors)."""
    return LocalTrainer(app, config, model).evaluation_sums(weights, clients)


def _evaluate(trainer: LocalTrainer, weights: dict[str, torch.Tensor], clients: list[int]) -> tuple[float, float]:
    """Federated evaluation of the new global model on the round's clients' test shares."""
    examples, loss_sum, correct = trainer.evaluation_sums(weights, clients)
    return (loss_sum / examples, correct / examples) if examples else (math.nan, math.nan)


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """`count` torch intra-op threads inside the block, the caller's setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_intra_op_thread() -> contextlib.AbstractContextManager[None]:
    """One torch intra-op thread while simulating.

    Many small models: a second intra-op thread costs more than it gives (its pool is started
    and spins between tiny ops) and fights the workers for cores; parallelism comes from
    worker processes instead. Everything from the initial weights on runs inside this."""
    return intra_op_threads(1)


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
    with one_intra_op_thread():
        return _round_loop(app, config, on_round, echo, pool_factory, on_client, on_round_start)


def _round_loop(
    app: App,
    config: SimulationConfig,
    on_round: Progress,
    echo: Callable[[str], None],
    pool_factory: PoolFactory | None,
    on_client: Callable[[float], None] | None,
    on_round_start: Callable[[int, int], None] | None,
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    from simulations.pool import WorkerPool

    workers = config.worker_count()
    pool: Pool | None = None
    privacy = config.privacy
    weights = app.initial_weights(config.seed)
    strategy = build_strategy(config.strategy, config.strategy_params, privacy, config.per_round, seed=config.seed)
    ledger = PrivacyLedger(privacy.accountant, delta=privacy.delta) if privacy.enabled else None
    sample_rate = config.per_round / config.clients
    trainer = LocalTrainer(app, config, app.build_model())
    sampler = random.Random(config.seed)
    records: list[RoundRecord] = []
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
                pool = WorkerPool(app, config, workers, local=trainer)
                echo(f"training on {workers} worker processes")
            parallel = pool is not None and aggregate.mergeable and len(selected) > 1
            client_seconds: list[float] = []
            if parallel:
                assert pool is not None
                for partial_aggregate, times in pool.train(number, weights, aggregate, selected, client_config):
                    aggregate.merge(partial_aggregate)
                    client_seconds += times
            else:
                client_seconds = trainer.fold(weights, selected, number, client_config, aggregate)
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
                eval_loss, eval_accuracy = _evaluate(trainer, weights, selected)
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
        if pool is not None:
            pool.close()
    return records, weights
