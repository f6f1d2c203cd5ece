"""Worker processes for the in-process backend: one per core, one intra-op thread each.

The simulating process is worker 0 itself: it trains its own share of each round on the
round loop's trainer while the other workers train theirs, so `workers=N` forks N - 1
processes (one fork, one exit and one message exchange fewer than N children and an idle
parent). Workers are forked once per simulation, so they inherit the loaded app, its data
and its partitions without copying or serialising them. Each round, every worker gets the
global weights, an empty aggregate of the round and its share of the clients; it trains them
one after another on its own model and sends back the partial aggregate, which the parent
merges. Tensors up to `BY_VALUE_BYTES` cross the pipes by value, larger ones in torch shared
memory. Clients go to workers by a deterministic greedy split on data size, so the same seed
and worker count give bit-identical results.

This is internal IPC between our own processes (multiprocessing pipes carrying pickled
tensors and shared-memory handles), not a trust boundary: nothing here is reachable from
the network.
"""

from __future__ import annotations

import gc
import heapq
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

from simulations.apps import App
from simulations.config import SimulationConfig
from strategies import RoundAggregate

if TYPE_CHECKING:
    from simulations.inprocess import LocalTrainer


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


# Tensors up to this size cross the pipe by value; larger ones in torch shared memory.
BY_VALUE_BYTES = 1 << 20


class _Pickler(ForkingPickler):
    """`ForkingPickler` (as `Connection.send` uses), except that small CPU tensors travel by value.

    Moving a tensor to shared memory costs a segment, a file descriptor passed through
    multiprocessing's resource sharer and a mapping on the other side: for the few-KB weights
    and partial sums of a small model that is several times what copying the bytes costs, and
    it is paid for every tensor of every message, twice a round. `Connection.recv` unpickles
    either kind, so only the sending side differs."""

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is torch.Tensor
            and obj.layout == torch.strided
            and obj.device.type == "cpu"
            and not obj.requires_grad
            and not obj.is_quantized
            and obj.numel() * obj.element_size() <= BY_VALUE_BYTES
        ):
            return _tensor_from_bytes, (_tensor_bytes(obj), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _send(conn: Connection, message: Any) -> None:
    conn.send_bytes(_Pickler.dumps(message))


def _for_workers(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global weights as a message carries them: large tensors copied into shared memory
    once (not moved: the caller's stay where they are), small ones as they are (sent by value)."""
    return {
        name: t.detach().clone().share_memory_() if t.numel() * t.element_size() > BY_VALUE_BYTES else t
        for name, t in weights.items()
    }


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def _handle(trainer: LocalTrainer, message: tuple[Any, ...]) -> Any:
    """What a worker does with a "train" or "evaluate" message (the parent too, for its own share)."""
    if message[0] == "train":
        _, number, weights, template, clients, client_config = message
        return trainer.share(weights, template, clients, number, client_config)
    _, weights, clients = message
    return trainer.evaluation_sums(weights, clients)


def _serve(app: App, config: SimulationConfig, conn: Connection) -> None:
    from simulations.inprocess import LocalTrainer

    torch.set_num_threads(1)
    trainer = LocalTrainer(app, config, app.build_model())
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        try:
            _send(conn, ("ok", _handle(trainer, message)))
        except Exception:  # report, don't die: the parent raises it with the traceback
            conn.send(("error", traceback.format_exc()))


class WorkerPool:
    """`workers` processes training shares of each round; with `local` (the round loop's trainer),
    this process is worker 0 and `workers - 1` are forked, else all `workers` are."""

    def __init__(self, app: App, config: SimulationConfig, workers: int, local: LocalTrainer | None = None) -> None:
        context = mp.get_context("fork")
        self.app, self.config = app, config
        self._local = local
        # Objects that exist at the fork go to the collector's permanent generation, so that no
        # full collection (in a worker or here) walks them and writes their GC headers: each such
        # write copies a page shared copy-on-write with the other processes. On W1 this halves
        # the page faults of each process (6,000 to 3,600) and cuts its CPU time by ~15%.
        # Unfrozen on `close` unless something else had frozen objects before us.
        self._unfreeze = gc.get_freeze_count() == 0
        gc.freeze()
        self._conns: list[Connection | None] = [None] if local is not None else []  # None: this process
        self._procs = []
        try:
            for index in range(len(self._conns), workers):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_serve, args=(app, config, child), daemon=True, name=f"leptonfl-sim-worker-{index}"
                )
                process.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(process)
        except BaseException:
            self.close()  # the workers started so far, and the freeze
            raise

    def _shares(self, clients: Sequence[int]) -> list[list[int]]:
        config = self.config
        sizes = {c: len(self.app.partition(c, config.clients, config.partition, config.seed)[0]) for c in clients}
        return greedy_shares(sizes, clients, len(self._conns))

    def _gather(self, messages: list[tuple[Any, ...]]) -> list[Any]:
        """Each worker's answer to its message, in worker order; this process's share is done
        while the others work. Every answer is collected before any failure is raised, so the
        pipes stay in step for `close`."""
        for conn, message in zip(self._conns, messages, strict=True):
            if conn is not None:
                _send(conn, message)
        results: list[Any] = []
        failure: Exception | None = None
        for conn, message in zip(self._conns, messages, strict=True):
            if conn is None:
                assert self._local is not None
                try:
                    results.append(_handle(self._local, message))
                except Exception as exc:  # raised as it is (as with one process), once the others answered
                    failure = failure or exc
                continue
            status, payload = conn.recv()
            if status != "ok":
                failure = failure or WorkerError(f"a simulation worker failed:\n{payload}")
            results.append(payload)
        if failure is not None:
            raise failure
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
        shared = _for_workers(weights)
        shares = self._shares(clients)
        return self._gather([("train", number, shared, template, share, dict(client_config)) for share in shares])

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        shared = _for_workers(weights)
        parts = self._gather([("evaluate", shared, share) for share in self._shares(clients)])
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))

    def close(self) -> None:
        if self._unfreeze:
            self._unfreeze = False
            gc.unfreeze()
        for conn in self._conns:
            if conn is None:
                continue
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for process in self._procs:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
