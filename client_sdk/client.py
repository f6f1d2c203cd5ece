"""`FederatedClient`: connect, fetch the global model, train, send the update — repeat.

Blocking with `run()`, or in a background thread with `start()` / `stop()`. Errors of
the server or of the app's trainer end the loop with an SDK exception (from `run()`, or
kept in `error` and re-raised by `join()` in background mode); the host app never sees a
raw gRPC error, and a stopped client never leaves threads behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from client_sdk.errors import LeptonError, RoundClosed, TrainingError
from client_sdk.trainer import Trainer
from client_sdk.transport import Backoff, FleetTransport, Stopped, task_config
from protos.channels import TLSFiles
from protos.v1 import fleet_pb2 as pb

log = logging.getLogger("leptonfl.client")
R = TypeVar("R")


@dataclass
class ClientStats:
    """What this client has done so far (read it from the host app at any time)."""

    rounds_trained: int = 0
    rounds_evaluated: int = 0
    late_results: int = 0


class FederatedClient:
    """Serves tasks of one app (optionally one run) from a Lepton FL server.

    `exit_when_idle`: once this client has taken part in a run and the server has no
    active run of its app left, `run()` returns — the one-shot behaviour of
    `leptonfl client`. Set it to False to keep serving future runs until `stop()`.
    """

    def __init__(
        self,
        server: str,
        app: str,
        trainer: Trainer,
        *,
        name: str = "",
        run_id: str = "",
        exit_when_idle: bool = True,
        backoff: Backoff = Backoff(),
        chunk_bytes: int = 1 << 20,
        tls: TLSFiles | None = None,
    ) -> None:
        self.trainer = trainer
        self.exit_when_idle = exit_when_idle
        self._stop = threading.Event()
        self.transport = FleetTransport(
            server, app, name=name, run_id=run_id, backoff=backoff, stop=self._stop, chunk_bytes=chunk_bytes, tls=tls
        )
        self.stats = ClientStats()
        self.error: LeptonError | None = None
        self._thread: threading.Thread | None = None

    @property
    def client_id(self) -> str:
        return self.transport.client_id

    def run(self) -> ClientStats:
        """Serve tasks until done (see `exit_when_idle`) or `stop()`; raises `LeptonError`."""
        try:
            self.transport.join()
            while not self._stop.is_set():
                answer = self.transport.get_task()
                if answer.HasField("task"):
                    self._serve(answer.task)
                    continue
                idle = answer.idle
                participated = self.stats.rounds_trained + self.stats.rounds_evaluated > 0
                if idle.run_ended or (self.exit_when_idle and participated and idle.active_runs == 0):
                    log.info("no more work for this client; finishing")
                    break
                self.transport.wait(max(idle.retry_after_ms, 50) / 1000)
        except Stopped:
            pass
        finally:
            self.transport.close()
        return self.stats

    def _serve(self, task: pb.Task) -> None:
        weights = self.transport.download(task)
        config = task_config(task)
        try:
            if task.type == pb.TRAIN:
                with _Heartbeats(self.transport):
                    result = _guard(lambda: self.trainer.fit(weights, config), "training")
                self.transport.upload(task, result.weights, result.num_examples, result.metrics)
                self.stats.rounds_trained += 1
                log.info("run %s round %d: update sent (%d examples)", task.run_id, task.round, result.num_examples)
            else:
                evaluation = _guard(lambda: self.trainer.evaluate(weights, config), "evaluation")
                self.transport.report_evaluation(task, evaluation.num_examples, evaluation.loss, evaluation.metrics)
                self.stats.rounds_evaluated += 1
        except RoundClosed as exc:
            # Too slow for the deadline: not an error of this client, just wait for the next task.
            self.stats.late_results += 1
            log.warning("run %s round %d: %s", task.run_id, task.round, exc)
        except TrainingError as exc:
            # The app's own code failed: the loop ends with this error, but first the server
            # hears of it, so the round does not wait for this client until its deadline.
            self.transport.report_failure(task, str(exc))
            raise

    # background mode --------------------------------------------------------------------
    def start(self) -> None:
        """Run in a daemon thread; check `error` or call `join()` to learn how it ended."""
        if self._thread is not None:
            raise RuntimeError("client already started")
        self._thread = threading.Thread(target=self._run_captured, name="leptonfl-client", daemon=True)
        self._thread.start()

    def _run_captured(self) -> None:
        try:
            self.run()
        except LeptonError as exc:
            self.error = exc
            log.error("federated client stopped: %s", exc)

    @property
    def running(self) -> bool:
        """True while the background loop is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end (interrupting waits and backoff) and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> ClientStats:
        """Wait for the background loop; re-raises the error that ended it, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.stats


def _guard(fn: Callable[[], R], what: str) -> R:
    try:
        return fn()
    except LeptonError:
        raise
    except Exception as exc:
        raise TrainingError(f"the app's {what} code raised {type(exc).__name__}: {exc}") from exc


class _Heartbeats:
    """Keeps the server's liveness view fresh while local training runs (it may take minutes)."""

    def __init__(self, transport: FleetTransport) -> None:
        self.transport = transport
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="leptonfl-heartbeat", daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.transport.heartbeat_interval):
            self.transport.heartbeat()
