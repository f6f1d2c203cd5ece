"""Ray backend: the in-process backend's round loop, with virtual clients trained on Ray actors,
for when one machine is not enough.

`run_ray` is `run_inprocess` with a `RayPool` in place of the worker processes: the strategy,
sampling, central DP and the privacy ledger stay in the driver, unchanged. Each actor reserves
one CPU, runs torch on one intra-op thread, loads the app itself from `config.app` (a path or a
module name, so it must resolve on every node: install leptonfl and the app there, or use the
same shared path) and builds its model once. Each round the driver puts the global weights and
the round's empty aggregate into the object store once (`ray.put`) and hands the references to
every actor with its share of the clients (the same deterministic greedy split on data size as
the worker processes); an actor folds its clients into a copy of the aggregate with the
backend's own `train_share`, so the math is the in-process backend's, and the partial
aggregates come back as Ray objects that the driver merges in actor order. Evaluation is split
the same way (`evaluation_sums`). Strategies whose aggregate cannot merge partials (median,
Krum) train in the driver, as with worker processes.

Trust: Ray moves weights and aggregates between the driver and its actors with its own
serialisation (pickle-based) inside the Ray cluster, which is one trust domain run by the same
operator. Nothing here touches the client-facing Fleet protocol, which stays pickle-free; never
expose a Ray cluster's ports to peers you would not let run code on it.

Without an address, a local Ray instance is started with one CPU per actor (and stopped again by
`RayPool.close`); with one (``auto``, ``HOST:PORT``, ``ray://HOST:10001``, or ``RAY_ADDRESS``
in the environment), the pool joins that cluster and leaves it running.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

try:
    import ray
except ImportError as exc:  # an optional extra
    raise ImportError("the ray backend needs Ray: pip install 'leptonfl[ray]'") from exc

from simulations.apps import App, load_app
from simulations.config import SimulationConfig
from simulations.inprocess import Progress, evaluation_sums, run_inprocess, train_share
from simulations.pool import WorkerError, greedy_shares
from simulations.report import RoundRecord
from strategies import RoundAggregate

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks


class RayWorkerError(WorkerError):
    """A Ray actor failed (an app error, a lost node, an actor that cannot start); the message
    carries the remote traceback."""


class Trainer:
    """One actor's state: the app (loaded on the actor's node) and one model, re-used."""

    def __init__(self, config: SimulationConfig) -> None:
        torch.set_num_threads(1)
        self.config = config
        self.app = load_app(config.app)
        self.model = self.app.build_model()

    def ready(self) -> bool:
        return True

    def train(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        client_config: Mapping[str, Any],
    ) -> tuple[RoundAggregate, list[float]]:
        return train_share(self.app, self.config, self.model, weights, template, clients, number, client_config)

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        return evaluation_sums(self.app, self.config, self.model, weights, clients)


RemoteTrainer = ray.remote(num_cpus=1)(Trainer)


def _connect(address: str | None, num_actors: int) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a lean local instance; True if we started one."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return False
    ray.init(
        num_cpus=num_actors if num_actors > 0 else None,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
        logging_level=logging.WARNING,
    )
    return True


class RayPool:
    """`WorkerPool`'s interface (`train`, `evaluate`, `close`) on Ray actors.

    `num_actors` <= 0: one actor per CPU of the cluster. `app` is used in the driver only, for the
    clients' data sizes (the split); it is loaded from `config.app` when not given. Actors are
    started and their app loaded before the constructor returns (`start_timeout_s`), so a cluster
    that cannot place them, or an app they cannot load, fails here with a clear error.
    """

    def __init__(
        self,
        config: SimulationConfig,
        num_actors: int = 0,
        address: str | None = None,
        *,
        app: App | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.config = config
        self.app = app if app is not None else load_app(config.app)
        self._owns_ray = _connect(address, num_actors)
        count = num_actors if num_actors > 0 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._actors: list[Any] = [RemoteTrainer.remote(config) for _ in range(count)]
        self._sizes: dict[int, int] = {}
        try:
            self._get([actor.ready.remote() for actor in self._actors], timeout=start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    def _shares(self, clients: Sequence[int]) -> list[list[int]]:
        for c in clients:
            if c not in self._sizes:
                self._sizes[c] = len(
                    self.app.partition(c, self.config.clients, self.config.partition, self.config.seed)[0]
                )
        return greedy_shares(self._sizes, clients, len(self._actors))

    def _get(self, refs: list[Any], timeout: float | None = None) -> list[Any]:
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError as exc:
            resources = ray.cluster_resources()
            raise RayWorkerError(
                f"{len(self._actors)} Ray actors (1 CPU each) did not start within {timeout:g}s; "
                f"the cluster has {resources.get('CPU', 0):g} CPUs"
            ) from exc
        except ray.exceptions.RayError as exc:
            raise RayWorkerError(f"a Ray actor failed:\n{_ANSI.sub('', str(exc))}") from exc

    def train(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        client_config: Mapping[str, Any],
    ) -> list[tuple[RoundAggregate, list[float]]]:
        """(partial aggregate, seconds per client), one per actor given clients, in actor order."""
        weights_ref = ray.put({name: t.detach() for name, t in weights.items()})
        template_ref = ray.put(template)
        settings = dict(client_config)
        refs = [
            actor.train.remote(number, weights_ref, template_ref, share, settings)
            for actor, share in zip(self._actors, self._shares(clients), strict=True)
            if share
        ]
        return self._get(refs)

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        """(examples, loss sum, correct) of `weights` over the clients' test shares."""
        weights_ref = ray.put({name: t.detach() for name, t in weights.items()})
        refs = [
            actor.evaluate.remote(weights_ref, share)
            for actor, share in zip(self._actors, self._shares(clients), strict=True)
            if share
        ]
        parts = self._get(refs)
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))

    def close(self) -> None:
        """Stop the actors; stop Ray too if this pool started it. Idempotent."""
        actors, self._actors = self._actors, []
        if not ray.is_initialized():
            return
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead: nothing to stop
                pass
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()


def run_ray(
    app: App,
    config: SimulationConfig,
    on_round: Progress,
    echo: Callable[[str], None] = lambda _: None,
    address: str | None = None,
    **hooks: Any,
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    """`run_inprocess` with its clients trained on `config.workers` Ray actors (0: one per CPU of
    the cluster) on the cluster at `address` (None: RAY_ADDRESS, else a local instance).
    Progress hooks (`on_round_start=`, ...) are passed on when `run_inprocess` takes them."""

    def make_pool(app: App, config: SimulationConfig, _workers: int) -> RayPool:
        echo("starting Ray actors" + (f" on the Ray cluster at {address}" if address else ""))
        pool = RayPool(config, config.workers, address, app=app)
        echo(f"training on {pool.num_actors} Ray actors")
        return pool

    accepted = inspect.signature(run_inprocess).parameters
    passed = {name: hook for name, hook in hooks.items() if name in accepted}
    return run_inprocess(app, config, on_round, echo, pool_factory=make_pool, **passed)
