"""Worker processes for the in-process backend: one per core, one intra-op thread each.

Workers are forked once per simulation, so they inherit the loaded app, its data and its
partitions without copying or serialising them. Each round, every worker gets the global
weights (torch shared memory), an empty aggregate of the round and its share of the
clients; it trains them one after another on its own model and sends back the partial
aggregate, which the parent merges. Clients go to workers by a deterministic greedy split
on data size, so the same seed and worker count give bit-identical results.

This is internal IPC between our own processes (multiprocessing pipes carrying shared-memory
tensor handles), not a trust boundary: nothing here is reachable from the network.
"""

from __future__ import annotations

import heapq
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as mp

from simulations.apps import App
from simulations.config import SimulationConfig
from strategies import RoundAggregate


def greedy_shares(sizes: Mapping[int, int], clients: Sequence[int], parts: int) -> list[list[int]]:
    """Split `clients` into `parts` shares: largest first (by `sizes`), each to the least-loaded
    share (ties: lowest index); each share sorted. Deterministic, so results repeat exactly."""
    heap = [(0, index) for index in range(parts)]
    shares: list[list[int]] = [[] for _ in range(parts)]
    for client in sorted(clients, key=lambda c: (-sizes[c], c)):
        load, index = heapq.heappop(heap)
        shares[index].append(client)
        heapq.heappush(heap, (load + sizes[client], index))
    return [sorted(share) for share in shares]


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def _serve(app: App, config: SimulationConfig, conn: Connection) -> None:
    from simulations.inprocess import LocalTrainer

    torch.set_num_threads(1)
    trainer = LocalTrainer(app, config, app.build_model())
    while True:
        message = conn.recv()
        try:
            if message[0] == "stop":
                return
            if message[0] == "train":
                _, number, weights, template, clients, client_config = message
                conn.send(("ok", trainer.share(weights, template, clients, number, client_config)))
            else:
                _, weights, clients = message
                conn.send(("ok", trainer.evaluation_sums(weights, clients)))
        except Exception:  # report, don't die: the parent raises it with the traceback
            conn.send(("error", traceback.format_exc()))


class WorkerPool:
    def __init__(self, app: App, config: SimulationConfig, workers: int) -> None:
        context = mp.get_context("fork")
        self.app, self.config = app, config
        self._conns: list[Connection] = []
        self._procs = []
        for index in range(workers):
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve, args=(app, config, child), daemon=True, name=f"leptonfl-sim-worker-{index}"
            )
            process.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(process)

    def _shares(self, clients: Sequence[int]) -> list[list[int]]:
        config = self.config
        sizes = {c: len(self.app.partition(c, config.clients, config.partition, config.seed)[0]) for c in clients}
        return greedy_shares(sizes, clients, len(self._conns))

    def _gather(self, messages: list[tuple[Any, ...]]) -> list[Any]:
        for conn, message in zip(self._conns, messages, strict=True):
            conn.send(message)
        results = []
        for conn in self._conns:
            status, payload = conn.recv()
            if status != "ok":
                raise WorkerError(f"a simulation worker failed:\n{payload}")
            results.append(payload)
        return results

    def train(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        client_config: Mapping[str, Any],
    ) -> list[tuple[RoundAggregate, list[float]]]:
        """(partial aggregate, seconds per client) of the round, one per worker, in worker order."""
        shared = {name: t.detach().clone().share_memory_() for name, t in weights.items()}
        shares = self._shares(clients)
        return self._gather([("train", number, shared, template, share, dict(client_config)) for share in shares])

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        shared = {name: t.detach().clone().share_memory_() for name, t in weights.items()}
        parts = self._gather([("evaluate", shared, share) for share in self._shares(clients)])
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for process in self._procs:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
