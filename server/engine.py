"""The round engine: the daemon's state machine, free of gRPC.

Per run: select online clients (over-selecting if the run asks) → persist the open round
(its selected clients and task ids) → hand out TRAIN tasks → spool each uploaded update to
disk, record it in the database, fold it into the strategy's aggregate, and only then
acknowledge it → close at the quorum (`clients_per_round` updates, or every selected client
answered) or at the deadline (extended once if short of `min_clients`, then the round is
retried with fresh clients, then the run fails) → commit checkpoint + round row + strategy
state + privacy ledger in one transaction → EVALUATE tasks for the new global model on the
clients that delivered → next round.

Servicers call the public methods from gRPC worker threads; a ticker thread opens and
closes rounds. One lock guards the in-memory state. Everything that must survive a crash
is on disk before a client hears "accepted": committed rounds, the open round and its
accepted updates (`Store`), checkpoints and spooled updates (`CheckpointStore`). After a
`kill -9` and a restart, each run resumes its open round with the same clients and task
ids, its aggregate re-folded from the spool; clients retry what was in flight, and
idempotency keys make a retried result count once.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from protos import PROTOCOL_VERSION
from protos.codec import (
    CodecError,
    StreamLimits,
    check_same_specs,
    model_header,
    non_finite_tensors,
)
from protos.v1 import fleet_pb2, tensors_pb2
from server.checkpoints import CheckpointStore
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from server.faults import crash_point
from server.metrics import DaemonMetrics
from server.store import (
    AcceptedUpdate,
    ClientRecord,
    OpenRoundRecord,
    Participation,
    RoundRecord,
    RunRecord,
    Store,
    now,
    token_digest,
)
from server.strategy_state import STATE_PREFIX, pack, split_state, unpack
from server.tensorfiles import LazyTensors, SpoolAssembler, sha256_of
from strategies import ClientUpdate, RoundAggregate, Strategy
from strategies.accounting import PrivacyLedger
from strategies.factory import PrivacySettings, build_strategy, epsilon_over_budget

log = logging.getLogger("leptonfl.engine")

TRAIN, EVALUATE = "train", "evaluate"
SERVER_METRICS = frozenset({"clip_norm", "sample_rate"})  # round metrics only the server writes
MAX_EXAMPLES = 1 << 40
MAX_KEY = 128  # characters of an idempotency key
MAX_REASON = 1000  # characters of a client's failure report


@dataclass(frozen=True)
class EngineConfig:
    """Timing and limits of the round engine (all overridable from the daemon's config)."""

    heartbeat_interval_s: float = 5.0
    liveness_timeout_s: float = 30.0
    # Once `min_clients` are online, wait this long for `clients_per_round` before starting.
    selection_grace_s: float = 3.0
    max_round_attempts: int = 3
    idle_retry_ms: int = 250
    max_update_bytes: int = 2 << 30
    max_metrics: int = 64
    tick_interval_s: float = 0.2
    # A round short of min_clients at its deadline gets this fraction of its timeout once more.
    deadline_extension: float = 0.5
    # Uploads streamed at the same time (each holds a socket, a file and a chunk of memory);
    # more are told to slow down (the SDK retries).
    upload_concurrency: int = 16

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(max_total_bytes=self.max_update_bytes)


@dataclass(frozen=True)
class RunSpecInput:
    """What an operator asks for when creating a run (validated by `RoundEngine.create_run`)."""

    app: str
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    num_rounds: int = 3
    clients_per_round: int = 2
    min_clients: int = 2
    round_timeout_s: float = 300.0
    client_config: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    privacy: PrivacySettings = PrivacySettings()
    # Select ceil(K × (1 + over_selection)) clients and close the round at K updates, so
    # stragglers and dropouts do not hold it up.
    over_selection: float = 0.0


@dataclass
class Session:
    record: ClientRecord
    last_seen: float


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str
    run_id: str
    round: int
    model_round: int
    client_id: str
    config: Mapping[str, Any]
    deadline: float


@dataclass(frozen=True)
class Idle:
    retry_after_ms: int
    active_runs: int
    run_ended: bool


@dataclass
class OpenRound:
    number: int
    attempt: int
    started: float
    deadline: float
    selected: list[str]
    aggregate: RoundAggregate
    phase: str = TRAIN
    tasks: dict[str, Task] = field(default_factory=dict)  # of the current phase
    task_ids: set[str] = field(default_factory=set)  # of both phases, so late results are recognised
    delivered: dict[str, Participation] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # client -> reason, of the current phase
    evaluated: dict[str, tuple[int, float, float | None]] = field(default_factory=dict)
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, client) -> idempotency key
    train_seconds: float = 0.0
    sample_rate: float = 1.0  # q of Poisson sampling under central DP
    extended: bool = False  # the deadline was extended once already

    def pending_clients(self) -> set[str]:
        done = self.delivered if self.phase == TRAIN else self.evaluated
        return {t.client_id for t in self.tasks.values() if t.client_id not in done and t.client_id not in self.failed}

    def record(self, run_id: str) -> OpenRoundRecord:
        """The durable form of this round (what a restarted daemon resumes from)."""
        return OpenRoundRecord(
            run_id=run_id,
            number=self.number,
            attempt=self.attempt,
            phase=self.phase,
            sample_rate=self.sample_rate,
            extended=self.extended,
            selected=list(self.selected),
            tasks={t.task_id: t.client_id for t in self.tasks.values()},
            evaluated={
                c: [n, loss, acc, self.keys.get((EVALUATE, c), "")] for c, (n, loss, acc) in self.evaluated.items()
            },
            train_seconds=self.train_seconds,
        )


class _AlreadyAccepted(Exception):
    """A retry of a result this daemon already made durable: acknowledge it again, count it once."""


@dataclass
class RunState:
    record: RunRecord
    strategy: Strategy
    weights: Mapping[str, torch.Tensor]  # the committed global model, backed by its checkpoint file
    header: tensors_pb2.ModelHeader
    privacy: PrivacySettings = PrivacySettings()
    ledger: PrivacyLedger | None = None
    open: OpenRound | None = None
    # Task ids of the previous round stay known, so a straggler hears "round closed", not "not assigned".
    retired_task_ids: set[str] = field(default_factory=set)
    attempt: int = 1
    waiting_since: float | None = None


def check_protocol(protocol_version: int) -> None:
    """Refuse a client of another protocol version, naming both (FAILED_PRECONDITION)."""
    if protocol_version != PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"client speaks Lepton FL protocol v{protocol_version}, this server speaks "
            f"v{PROTOCOL_VERSION}; upgrade the older side"
        )


class RoundEngine:
    def __init__(
        self,
        store: Store,
        checkpoints: CheckpointStore,
        config: EngineConfig = EngineConfig(),
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self.metrics = metrics or DaemonMetrics()
        self.store = store
        self.checkpoints = checkpoints
        self.config = config
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._sessions: dict[str, Session] = {}
        self._runs: dict[str, RunState] = {}
        self._tasks: dict[str, Task] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # set on every state change: a full quorum closes at once
        self._ticker: threading.Thread | None = None
        self._upload_slots = threading.BoundedSemaphore(config.upload_concurrency)
        self._resume_runs()

    # lifecycle --------------------------------------------------------------------------
    def _resume_runs(self) -> None:
        for record in self.store.list_runs(statuses=("pending", "running")):
            open_round = self.store.open_round(record.id)
            evaluating = open_round is not None and open_round[0].phase == EVALUATE
            if record.committed_rounds >= record.num_rounds and not evaluating:
                self.store.set_run_status(record.id, "completed")
                self.checkpoints.discard_updates(record.id)
                continue
            state = self._runs[record.id] = self._load_run_state(record)
            if open_round is not None:
                self._resume_open_round(state, *open_round)
            self.checkpoints.discard_updates(record.id, keep_round=state.open.number if state.open else None)
            log.info(
                "resuming run %s after round %d of %d%s",
                record.id,
                record.committed_rounds,
                record.num_rounds,
                f" (round {state.open.number} {state.open.phase} phase open, "
                f"{len(state.open.delivered)} updates already accepted)"
                if state.open
                else "",
            )

    def _resume_open_round(self, state: RunState, saved: OpenRoundRecord, updates: list[AcceptedUpdate]) -> None:
        """Rebuild a round that was open when the daemon died: same clients, same task ids,
        the accepted updates folded again from their spool files, a fresh deadline."""
        run, clock = state.record, time.monotonic()
        expected = run.committed_rounds if saved.phase == EVALUATE else run.committed_rounds + 1
        if saved.number != expected:
            log.warning("run %s: dropping a stale open round %d (committed %d)", run.id, saved.number, expected)
            self.store.drop_open_round(run.id)
            return
        open_ = OpenRound(
            saved.number,
            saved.attempt,
            clock,
            clock + run.round_timeout_s,
            list(saved.selected),
            state.strategy.begin_round(saved.number, state.weights),
            phase=saved.phase,
            train_seconds=saved.train_seconds,
            sample_rate=saved.sample_rate,
            extended=saved.extended,
        )
        if saved.phase == TRAIN:
            for accepted in updates:
                path = self.checkpoints.root / accepted.path
                if not path.exists() or sha256_of(path) != accepted.sha256:
                    log.error("run %s: spooled update of %s is missing or corrupt; dropped", run.id, accepted.client_id)
                    continue
                weights = LazyTensors(path)
                open_.aggregate.add(ClientUpdate(weights, accepted.num_examples, accepted.metrics))
                open_.delivered[accepted.client_id] = Participation(
                    accepted.client_id, accepted.num_examples, accepted.metrics
                )
                open_.keys[(TRAIN, accepted.client_id)] = accepted.idempotency_key
            config = {**run.client_config, **state.strategy.configure_round(saved.number)}
        else:
            for client_id, (n, loss, acc, key) in saved.evaluated.items():
                open_.evaluated[client_id] = (int(n), float(loss), None if acc is None else float(acc))
                open_.keys[(EVALUATE, client_id)] = str(key)
            config = dict(run.client_config)
        self._hand_out(state, open_, saved.phase, saved.tasks.values(), config, task_ids=list(saved.tasks))
        state.open = open_

    def _load_run_state(self, record: RunRecord) -> RunState:
        """A run's in-memory state, exactly as of its last committed round."""
        checkpoint = self.store.checkpoint(record.id)
        assert checkpoint is not None, f"run {record.id} has no checkpoint"
        stored = self.checkpoints.open(checkpoint)
        # The global model stays in its checkpoint file (read through the page cache on each
        # download): a multi-GiB model does not also sit in the daemon's heap for the round.
        weights = stored.view(lambda name: not name.startswith(STATE_PREFIX))
        _, state_tensors = unpack({n: t.clone() for n, t in stored.items() if n.startswith(STATE_PREFIX)})
        privacy = PrivacySettings.from_dict(record.privacy)
        strategy = build_strategy(record.strategy, record.strategy_params, privacy, record.clients_per_round)
        strategy.load_state_dict({**record.strategy_state, **state_tensors})
        ledger = _ledger_from(record.privacy_ledger) if privacy.enabled else None
        return RunState(record, strategy, weights, model_header(weights), privacy, ledger)

    def start(self) -> None:
        self._ticker = threading.Thread(target=self._tick_loop, name="round-engine", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Stop the ticker. Open rounds stay in the database and resume after a restart."""
        self._stop.set()
        self._wake.set()
        if self._ticker:
            self._ticker.join(timeout=5)
        with self._lock:
            for state in self._runs.values():
                if state.open:
                    log.info("round %d of run %s stays open for the next start", state.open.number, state.record.id)
            self._notify()

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_interval_s)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a bug in one tick must not kill the daemon's engine
                log.exception("round engine tick failed")

    def _notify(self) -> None:
        self._version += 1
        self._changed.notify_all()
        self._wake.set()

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until the state version moves past `version` (or timeout); return the new one."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version or self._stop.is_set(), timeout)
            return self._version

    # clients ----------------------------------------------------------------------------
    def join(
        self,
        protocol_version: int,
        app: str,
        name: str,
        run_id: str,
        client_id: str = "",
        token: str = "",
        identity: str | None = None,
    ) -> tuple[str, str]:
        """Register a client; returns (client id, session token).

        With mTLS, `identity` (the certificate's common name) fixes the client id, so a
        certificate always maps to the same client and can act only as that client.
        """
        check_protocol(protocol_version)
        _check_text("app", app, required=True)
        _check_text("name", name)
        _check_text("run_id", run_id, limit=64)
        if run_id and self.store.get_run(run_id) is None:
            raise NotFound(f"unknown run {run_id!r}")
        with self._lock:
            if identity is not None:
                client_id = _client_id_of(identity)
                token = secrets.token_urlsafe(24)
                mtls_record = ClientRecord(client_id, name or identity, app, run_id, token_digest(token))
                self.store.save_client(mtls_record)
                self._sessions[client_id] = Session(mtls_record, time.monotonic())
                log.info("client %s joined with certificate %r (app %s)", client_id, identity, app)
                return client_id, token
            if client_id:
                known = self._sessions.get(client_id)
                record = known.record if known else self.store.get_client(client_id)
                if record and record.token_sha256 == token_digest(token):
                    updated = replace(record, app=app, name=name, run_filter=run_id)
                    if updated != record:
                        self.store.save_client(updated)
                    self._sessions[client_id] = Session(updated, time.monotonic())
                    return client_id, token
            client_id, token = f"c-{secrets.token_hex(6)}", secrets.token_urlsafe(24)
            record = ClientRecord(client_id, name, app, run_id, token_digest(token))
            self.store.save_client(record)
            self._sessions[client_id] = Session(record, time.monotonic())
            log.info("client %s joined (app %s, %s)", client_id, app, name or "unnamed")
            return client_id, token

    def authenticate(self, client_id: str, token: str, identity: str | None = None) -> str:
        if identity is not None and client_id != _client_id_of(identity):
            raise PermissionDenied(f"certificate {identity!r} cannot act as client {client_id!r}")
        with self._lock:
            session = self._sessions.get(client_id)
            if session is None:
                record = self.store.get_client(client_id) if client_id else None
                if record is None:
                    raise Unauthenticated("unknown client id; call Join first")
                session = self._sessions[client_id] = Session(record, time.monotonic())
            if session.record.token_sha256 != token_digest(token):
                raise Unauthenticated("wrong client token; call Join again")
            session.last_seen = time.monotonic()
            return client_id

    def get_task(self, client_id: str) -> Task | Idle:
        with self._lock:
            for state in self._runs.values():
                open_ = state.open
                if open_ is None:
                    continue
                for task in open_.tasks.values():
                    if task.client_id == client_id and client_id in open_.pending_clients():
                        return task
            session = self._sessions[client_id]
            active = sum(1 for s in self._runs.values() if s.record.app == session.record.app)
            run_filter = session.record.run_filter
            ended = bool(run_filter) and run_filter not in self._runs
            if run_filter and not ended:
                active = 1
            return Idle(self.config.idle_retry_ms, 0 if ended else active, ended)

    def task_model(self, client_id: str, task_id: str) -> Mapping[str, torch.Tensor]:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:  # its round closed (or the run ended) since the client got it: a late client
                raise FailedPrecondition(f"task {task_id!r} is unknown or expired (its round is closed)")
            if task.client_id != client_id:
                raise NotFound(f"no task {task_id!r} for this client")
            state = self._runs.get(task.run_id)
            if state is None:
                raise FailedPrecondition(f"run {task.run_id} has ended")
            if task.model_round == state.record.committed_rounds:
                return state.weights
        return self.checkpoint_weights(task.run_id, task.model_round)

    def receive_update(
        self, client_id: str, header: fleet_pb2.UploadHeader, chunks: Iterable[tensors_pb2.TensorData]
    ) -> None:
        """Validate one streamed update, spool it to disk and record it (durable), fold it,
        and only then return (the client's acknowledgement). Any error discards the partial
        update; a retry of an accepted update (same idempotency key) is acknowledged again."""
        key = header.idempotency_key
        _check_text("idempotency key", key, limit=MAX_KEY)
        try:
            task = self._assigned_task(client_id, header.task_id, header.run_id, header.round, TRAIN, key)
        except _AlreadyAccepted:
            log.info("run %s round %d: repeated upload of %s acknowledged", header.run_id, header.round, client_id)
            return
        with self._lock:
            expected = self._runs[task.run_id].header
        if not 0 < header.num_examples <= MAX_EXAMPLES:
            raise InvalidArgument(f"num_examples must be in 1..{MAX_EXAMPLES}, got {header.num_examples}")
        metrics = self._metrics(header.metrics)
        limits = self.config.stream_limits()
        if header.model.total_bytes > limits.max_total_bytes:
            raise InvalidArgument(
                f"update of {header.model.total_bytes} bytes exceeds the limit of {limits.max_total_bytes}"
            )
        if not self._upload_slots.acquire(timeout=1.0):
            raise ResourceExhausted(
                f"slow down: {self.config.upload_concurrency} uploads are already streaming; retry shortly"
            )
        try:
            relative = self.checkpoints.update_path(task.run_id, task.round, client_id)
            weights = self._spool(header, expected, chunks, limits, relative)
        except FileNotFoundError:
            # The round closed while this update streamed, and its spool directory went with it:
            # a late result (FAILED_PRECONDITION), not a fault of the daemon.
            with self._lock:
                self._still_open(task, TRAIN, key)
            raise
        finally:
            self._upload_slots.release()
        try:
            self._accept(task, client_id, key, int(header.num_examples), metrics, weights, relative)
            self.metrics.bytes_received.inc(header.model.total_bytes)
        except BaseException:
            weights.path.unlink(missing_ok=True)
            raise

    def _spool(
        self,
        header: fleet_pb2.UploadHeader,
        expected: tensors_pb2.ModelHeader,
        chunks: Iterable[tensors_pb2.TensorData],
        limits: StreamLimits,
        relative: str,
    ) -> LazyTensors:
        """Stream an update into a fsynced spool file (one chunk of memory, whatever its size)."""
        try:
            check_same_specs(header.model, expected)
            assembler = SpoolAssembler(header.model, limits, self.checkpoints.root / relative)
        except CodecError as exc:
            raise InvalidArgument(str(exc)) from exc
        try:
            for chunk in chunks:
                assembler.add(chunk)
                crash_point("upload")
            weights = assembler.finish()
        except CodecError as exc:
            assembler.abort()
            raise InvalidArgument(str(exc)) from exc
        except BaseException:
            assembler.abort()
            raise
        bad = non_finite_tensors(weights)
        if bad:
            weights.path.unlink(missing_ok=True)
            raise InvalidArgument(f"update has NaN or Inf values in {', '.join(bad)}")
        return weights

    def _accept(
        self,
        task: Task,
        client_id: str,
        key: str,
        num_examples: int,
        metrics: dict[str, Any],
        weights: LazyTensors,
        relative: str,
    ) -> None:
        with self._lock:
            try:
                open_ = self._still_open(task, TRAIN, key)
            except _AlreadyAccepted:  # a concurrent retry won the race; this copy is not needed
                weights.path.unlink(missing_ok=True)
                return
            self.store.accept_update(
                AcceptedUpdate(
                    task.run_id,
                    task.round,
                    client_id,
                    task.task_id,
                    key,
                    num_examples,
                    metrics,
                    relative,
                    weights.sha256,  # hashed while it was written
                )
            )
            crash_point("accepted")
            open_.aggregate.add(ClientUpdate(weights, num_examples, metrics))
            open_.delivered[client_id] = Participation(client_id, num_examples, metrics)
            open_.keys[(TRAIN, client_id)] = key
            self.metrics.updates_accepted.inc()
            log.info(
                "run %s round %d: update %d/%d from %s (%d examples)",
                task.run_id,
                task.round,
                len(open_.delivered),
                len(open_.tasks),
                client_id,
                num_examples,
            )
            self._notify()

    def report_evaluation(self, client_id: str, report: fleet_pb2.EvaluationReport) -> None:
        key = report.idempotency_key
        _check_text("idempotency key", key, limit=MAX_KEY)
        try:
            task = self._assigned_task(client_id, report.task_id, report.run_id, report.round, EVALUATE, key)
        except _AlreadyAccepted:
            return
        if not 0 < report.num_examples <= MAX_EXAMPLES or not math.isfinite(report.loss):
            raise InvalidArgument("evaluation needs num_examples > 0 and a finite loss")
        metrics = self._metrics(report.metrics)
        accuracy = metrics.get("accuracy")
        if accuracy is not None and not (isinstance(accuracy, float | int) and 0 <= accuracy <= 1):
            raise InvalidArgument(f"accuracy must be a number in [0, 1], got {accuracy!r}")
        result = (int(report.num_examples), report.loss, None if accuracy is None else float(accuracy))
        with self._lock:
            try:
                open_ = self._still_open(task, EVALUATE, key)
            except _AlreadyAccepted:
                return
            self.store.record_evaluation(task.run_id, client_id, [*result, key])
            crash_point("evaluation")
            open_.evaluated[client_id] = result
            open_.keys[(EVALUATE, client_id)] = key
            self._notify()

    def report_failure(self, client_id: str, report: fleet_pb2.FailureReport) -> None:
        """The client's app failed on its task: stop waiting for it in this phase, and leave it
        out of selection until it asks for work again (its SDK loop has likely ended)."""
        _check_text("failure reason", report.reason, limit=MAX_REASON)
        with self._lock:
            task = self._tasks.get(report.task_id)
            kind = task.kind if task is not None else TRAIN
            task = self._assigned_task(client_id, report.task_id, report.run_id, report.round, kind, "")
            open_ = self._still_open(task, kind, "")
            if client_id in open_.failed:
                return  # a repeat: acknowledged, counted once
            open_.failed[client_id] = report.reason
            self._sessions[client_id].last_seen = -math.inf
            self.metrics.client_failures.labels(kind=kind).inc()
            log.warning(
                "run %s round %d: client %s reports that its %s failed: %r",  # %r: one line, whatever it sent
                task.run_id,
                task.round,
                client_id,
                "training" if kind == TRAIN else "evaluation",
                report.reason,
            )
            self._notify()

    def _assigned_task(self, client_id: str, task_id: str, run_id: str, number: int, kind: str, key: str) -> Task:
        with self._lock:
            if self.store.get_run(run_id) is None:
                raise NotFound(f"unknown run {run_id!r}")
            task = self._tasks.get(task_id)
            if task is None:
                # Expired long ago, or issued before a daemon restart: the client should ask for new work.
                raise FailedPrecondition(f"task {task_id!r} is unknown or expired (its round is closed)")
            if task.client_id != client_id or task.run_id != run_id or task.round != number:
                raise PermissionDenied(f"this client was not assigned run {run_id} round {number}")
            if task.kind != kind:
                raise FailedPrecondition(f"task {task_id} is a {task.kind} task, not {kind}")
            self._still_open(task, kind, key)
            return task

    def _still_open(self, task: Task, kind: str, key: str) -> OpenRound:
        state = self._runs.get(task.run_id)
        open_ = state.open if state else None
        if open_ is not None and open_.number == task.round:
            if task.client_id in (open_.delivered if kind == TRAIN else open_.evaluated):
                if key and open_.keys.get((kind, task.client_id)) == key:
                    raise _AlreadyAccepted()
                raise AlreadyExists(f"{kind} result for run {task.run_id} round {task.round} already accepted")
            if open_.phase == kind and task.task_id in open_.tasks:
                return open_
        raise FailedPrecondition(f"run {task.run_id} round {task.round} is closed for {kind} results")

    def _metrics(self, raw: Mapping[str, fleet_pb2.Scalar]) -> dict[str, Any]:
        if len(raw) > self.config.max_metrics:
            raise InvalidArgument(f"{len(raw)} metrics exceed the limit of {self.config.max_metrics}")
        out: dict[str, Any] = {}
        for key, scalar in raw.items():
            _check_text("metric name", key, required=True)
            kind = scalar.WhichOneof("value")
            if kind is None:
                raise InvalidArgument(f"metric {key!r} has no value")
            value = getattr(scalar, kind)
            if kind == "double_value" and not math.isfinite(value):
                raise InvalidArgument(f"metric {key!r} is not finite")
            if kind == "string_value":
                _check_text(f"metric {key!r}", value)
            out[key] = value
        return out

    # runs -------------------------------------------------------------------------------
    def create_run(self, spec: RunSpecInput, weights: Mapping[str, torch.Tensor]) -> RunRecord:
        _check_text("app", spec.app, required=True)
        _check_text("name", spec.name)
        if spec.num_rounds < 1:
            raise InvalidArgument("rounds must be at least 1")
        if spec.clients_per_round < 1:
            raise InvalidArgument("clients per round must be at least 1")
        # Under central DP, min_clients is the smallest online population a round samples from
        # (q = K / population), so it may exceed K; otherwise it is the quorum, at most K.
        if spec.min_clients < 1 or (not spec.privacy.enabled and spec.min_clients > spec.clients_per_round):
            raise InvalidArgument(
                f"min clients must be between 1 and clients per round ({spec.clients_per_round}), "
                f"got {spec.min_clients}"
            )
        if not (spec.round_timeout_s > 0 and math.isfinite(spec.round_timeout_s)):
            raise InvalidArgument("round timeout must be a positive number of seconds")
        if not 0 <= spec.over_selection <= 10:
            raise InvalidArgument(f"over-selection must be a fraction of K in 0..10, got {spec.over_selection}")
        if spec.over_selection and spec.privacy.enabled:
            raise InvalidArgument("over-selection does not apply under central DP (clients are Poisson-sampled)")
        try:
            strategy = build_strategy(spec.strategy, spec.strategy_params, spec.privacy, spec.clients_per_round)
            validate_for = getattr(strategy, "validate_for", None)
            if validate_for is not None:  # e.g. Krum: a round may close with as few as min_clients updates
                validate_for(spec.min_clients)
            ledger = PrivacyLedger(spec.privacy.accountant, delta=spec.privacy.delta) if spec.privacy.enabled else None
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(str(exc)) from exc
        if not weights:
            raise InvalidArgument("the initial model has no tensors")
        if any(name.startswith(STATE_PREFIX) or name == "__metadata__" for name in weights):
            raise InvalidArgument(f"tensor names starting with {STATE_PREFIX!r}, and '__metadata__', are reserved")
        for what, values in (("strategy parameter", spec.strategy_params), ("client config", spec.client_config)):
            for key, value in values.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise InvalidArgument(f"{what} {key!r} must be a finite number, not {value}")
        bad = non_finite_tensors(weights)
        if bad:
            raise InvalidArgument(f"initial model has NaN or Inf values in {', '.join(bad)}")
        run_id = f"run-{secrets.token_hex(4)}"
        stamp = now()
        record = RunRecord(
            id=run_id,
            name=spec.name,
            app=spec.app,
            strategy=spec.strategy,
            strategy_params=dict(spec.strategy_params),
            client_config=dict(spec.client_config),
            num_rounds=spec.num_rounds,
            clients_per_round=spec.clients_per_round,
            min_clients=spec.min_clients,
            round_timeout_s=spec.round_timeout_s,
            status="running",
            status_reason="",
            committed_rounds=0,
            strategy_state={},
            created_at=stamp,
            updated_at=stamp,
            privacy=spec.privacy.to_dict(),
            privacy_ledger=_ledger_state(ledger),
            over_selection=spec.over_selection,
        )
        weights = dict(weights)
        json_state, state_tensors = split_state(strategy.state_dict())
        record = replace(record, strategy_state=json_state)
        checkpoint = self.checkpoints.save(run_id, 0, pack(weights, state_tensors))
        stored = self.checkpoints.open(checkpoint, verify=False).view(weights.__contains__)
        with self._lock:
            self.store.create_run(record, checkpoint)
            self._runs[run_id] = RunState(record, strategy, stored, model_header(weights), spec.privacy, ledger)
            self._notify()
        log.info(
            "created run %s: app %s, %s, %d rounds, %d clients per round",
            run_id,
            spec.app,
            spec.strategy,
            spec.num_rounds,
            spec.clients_per_round,
        )
        return record

    def get_run(self, run_id: str) -> RunRecord:
        record = self.store.get_run(run_id)
        if record is None:
            raise NotFound(f"unknown run {run_id!r}")
        return record

    def list_runs(self) -> list[RunRecord]:
        return self.store.list_runs()

    def rounds(self, run_id: str, since: int = 0) -> list[RoundRecord]:
        self.get_run(run_id)
        return self.store.rounds(run_id, since)

    def progress(self, run_id: str) -> tuple[int, int, int]:
        """(open round number, updates received, clients selected); zeros when none is open."""
        with self._lock:
            state = self._runs.get(run_id)
            if state is None or state.open is None:
                return 0, 0, 0
            return state.open.number, len(state.open.delivered), len(state.open.selected)

    def cancel_run(self, run_id: str, reason: str) -> RunRecord:
        _check_text("reason", reason)
        with self._lock:
            record = self.get_run(run_id)
            if not record.active:
                raise FailedPrecondition(f"run {run_id} is already {record.status}")
            self._end_run(run_id, "cancelled", reason or "cancelled by the operator")
        return self.get_run(run_id)

    def checkpoint_weights(self, run_id: str, number: int | None) -> Mapping[str, torch.Tensor]:
        """A committed model, file-backed (for streaming it out; sha256 checked)."""
        self.get_run(run_id)
        checkpoint = self.store.checkpoint(run_id, number)
        if checkpoint is None:
            raise NotFound(f"run {run_id} has no committed checkpoint for round {number}")
        return self.checkpoints.open(checkpoint).view(lambda name: not name.startswith(STATE_PREFIX))

    def _end_run(self, run_id: str, status: str, reason: str = "") -> None:
        state = self._runs.pop(run_id, None)
        if state and state.open:
            self._drop_open_round(state)
        for task_id in state.retired_task_ids if state else ():
            self._tasks.pop(task_id, None)
        self.store.set_run_status(run_id, status, reason)
        self.checkpoints.discard_updates(run_id)
        log.info("run %s %s%s", run_id, status, f": {reason}" if reason else "")
        self._notify()

    def _drop_open_round(self, state: RunState) -> None:
        assert state.open is not None
        for task_id in state.retired_task_ids:
            self._tasks.pop(task_id, None)
        state.retired_task_ids, state.open = state.open.task_ids, None

    # rounds -----------------------------------------------------------------------------
    def tick(self) -> None:
        """Open rounds that can start, close those at quorum or past their deadline."""
        clock = time.monotonic()
        with self._lock:
            for state in list(self._runs.values()):
                if state.open is None:
                    self._maybe_open_round(state, clock)
                elif self._quorum_reached(state) or clock >= state.open.deadline:
                    self._close_phase(state, clock)

    def _quorum_reached(self, state: RunState) -> bool:
        """Every selected client answered, or (training, without DP) K updates are in."""
        open_ = state.open
        assert open_ is not None
        if not open_.pending_clients():
            return True
        quorum = state.record.clients_per_round
        return open_.phase == TRAIN and not state.privacy.enabled and len(open_.delivered) >= quorum

    def online_count(self) -> int:
        clock = time.monotonic()
        with self._lock:
            return sum(1 for s in self._sessions.values() if clock - s.last_seen <= self.config.liveness_timeout_s)

    def active_run_count(self) -> int:
        with self._lock:
            return len(self._runs)

    def _online_clients(self, app: str, run_id: str, clock: float) -> list[str]:
        busy = {t.client_id for s in self._runs.values() if s.open for t in s.open.tasks.values()}
        return sorted(
            cid
            for cid, s in self._sessions.items()
            if clock - s.last_seen <= self.config.liveness_timeout_s
            and s.record.app == app
            and s.record.run_filter in ("", run_id)
            and cid not in busy
        )

    def _maybe_open_round(self, state: RunState, clock: float) -> None:
        run = state.record
        eligible = self._online_clients(run.app, run.id, clock)
        if len(eligible) < run.min_clients:
            state.waiting_since = None
            return
        if state.waiting_since is None:
            state.waiting_since = clock
        if len(eligible) < run.clients_per_round and clock - state.waiting_since < self.config.selection_grace_s:
            return
        number = run.committed_rounds + 1
        sample_rate = 1.0
        if state.privacy.enabled:
            # Poisson sampling with q = K / population: what the accountant's amplification assumes.
            sample_rate = min(1.0, run.clients_per_round / len(eligible))
            if self._over_budget(state, sample_rate):
                return
            sampler = secrets.SystemRandom()
            selected = [c for c in eligible if sampler.random() < sample_rate]
        else:
            rng = random.Random(f"{run.id}/{number}/{state.attempt}")
            wanted = math.ceil(run.clients_per_round * (1 + run.over_selection))
            selected = rng.sample(eligible, min(wanted, len(eligible)))
        open_ = OpenRound(
            number,
            state.attempt,
            clock,
            clock + run.round_timeout_s,
            selected,
            state.strategy.begin_round(number, state.weights),
        )
        open_.sample_rate = sample_rate
        config = {**run.client_config, **state.strategy.configure_round(number)}
        self._hand_out(state, open_, TRAIN, selected, config)
        self.store.save_open_round(open_.record(run.id))  # before any client can see a task
        state.open, state.waiting_since = open_, None
        log.info(
            "run %s round %d/%d: selected %d clients (attempt %d)",
            run.id,
            number,
            run.num_rounds,
            len(selected),
            state.attempt,
        )
        self._notify()

    def _over_budget(self, state: RunState, sample_rate: float) -> bool:
        """End the run before a round that would take epsilon above its budget."""
        ledger = state.ledger
        upcoming = None if ledger is None else epsilon_over_budget(state.privacy, ledger, sample_rate)
        if ledger is None or upcoming is None:
            return False
        self._end_run(
            state.record.id,
            "budget_exhausted",
            f"round {state.record.committed_rounds + 1} would raise epsilon from {ledger.epsilon():.4f} to "
            f"{upcoming:.4f}, above the budget of {state.privacy.epsilon_budget:g} (delta {state.privacy.delta:g})",
        )
        return True

    def _hand_out(
        self,
        state: RunState,
        open_: OpenRound,
        kind: str,
        clients: Iterable[str],
        config: Mapping[str, Any],
        task_ids: list[str] | None = None,
    ) -> None:
        """Create the phase's tasks (fresh ids, or `task_ids` when resuming a persisted round)."""
        open_.tasks, open_.failed = {}, {}
        for i, client_id in enumerate(clients):
            task = Task(
                task_ids[i] if task_ids else secrets.token_hex(8),
                kind,
                state.record.id,
                open_.number,
                state.record.committed_rounds,
                client_id,
                dict(config),
                open_.deadline,
            )
            open_.tasks[task.task_id] = task
            open_.task_ids.add(task.task_id)
            self._tasks[task.task_id] = task

    def _close_phase(self, state: RunState, clock: float) -> None:
        open_, run = state.open, state.record
        assert open_ is not None
        if open_.phase == TRAIN:
            # Under central DP a round commits whatever arrived (even nothing: noise only), as
            # DP-FedAvg's analysis assumes; otherwise the quorum is min_clients.
            if len(open_.delivered) >= (0 if state.privacy.enabled else run.min_clients):
                self._commit_round(state, clock)
                return
            if not open_.extended and self.config.deadline_extension > 0:
                extra = run.round_timeout_s * self.config.deadline_extension
                open_.extended, open_.deadline = True, clock + extra
                self.store.save_open_round(open_.record(run.id))
                log.warning(
                    "run %s round %d: %d of %d needed updates by the deadline; extending it once by %.1f s",
                    run.id,
                    open_.number,
                    len(open_.delivered),
                    run.min_clients,
                    extra,
                )
                return
            reason = (
                f"round {open_.number}: {len(open_.delivered)} of {len(open_.selected)} updates by the "
                f"deadline ({run.round_timeout_s:g} s, extended once), {run.min_clients} needed"
            )
            self._drop_open_round(state)
            self.store.drop_open_round(run.id)
            self.checkpoints.discard_updates(run.id)
            self.metrics.rounds_failed.inc()
            if state.attempt >= self.config.max_round_attempts:
                self._end_run(run.id, "failed", f"{reason}; gave up after {state.attempt} attempts")
            else:
                log.warning("run %s %s; retrying with fresh clients", run.id, reason)
                state.attempt += 1
                self._notify()
            return
        self._finish_evaluation(state)

    def _commit_round(self, state: RunState, clock: float) -> None:
        try:
            self._commit_round_unsafe(state, clock)
        except Exception:
            # finish_round may have moved the strategy's state on: rebuild it from the last commit.
            log.exception("committing round of run %s failed; reloading its last committed state", state.record.id)
            self._drop_open_round(state)
            record = self.store.get_run(state.record.id)
            if record is not None:
                state = self._runs[record.id] = self._load_run_state(record)
                saved = self.store.open_round(record.id)
                if saved is not None:  # the round and its accepted updates are still durable: retry it
                    self._resume_open_round(state, *saved)
            self._notify()

    def _commit_round_unsafe(self, state: RunState, clock: float) -> None:
        open_, run = state.open, state.record
        assert open_ is not None
        aggregation_started = time.perf_counter()
        clip_norm = getattr(state.strategy, "clip_norm", None)  # central DP: the norm this round used
        crash_point("aggregate")
        weights = state.strategy.finish_round(open_.number, state.weights, open_.aggregate)
        metrics: dict[str, Any] = dict(open_.aggregate.metrics())
        if "epsilon" in metrics:  # clients' own (local DP) epsilons; "epsilon" is the run's central one
            metrics["local_epsilon_mean"] = metrics.pop("epsilon")
        for key in SERVER_METRICS & metrics.keys():  # a client may not pose as the server's DP figures
            metrics[f"client_{key}"] = metrics.pop(key)
        ledger_state: dict[str, Any] | None = None
        if state.ledger is not None:
            ledger = _ledger_from(state.ledger.state_dict())
            ledger.record_round(state.privacy.noise_multiplier, open_.sample_rate)
            ledger_state = _ledger_state(ledger)
            metrics.update(epsilon=ledger_state["epsilon"], clip_norm=clip_norm, sample_rate=open_.sample_rate)
        json_state, state_tensors = split_state(state.strategy.state_dict())
        checkpoint = self.checkpoints.save(run.id, open_.number, pack(weights, state_tensors))
        round_ = RoundRecord(
            run_id=run.id,
            number=open_.number,
            num_clients=open_.aggregate.num_updates,
            num_examples=open_.aggregate.num_examples,
            train_loss=metrics.get("train_loss"),
            eval_loss=None,
            eval_accuracy=None,
            eval_clients=0,
            duration_s=clock - open_.started,
            metrics=metrics,
        )
        crash_point("checkpoint")
        evaluation = replace(
            open_.record(run.id),
            phase=EVALUATE,
            tasks={},
            evaluated={},
            train_seconds=clock - open_.started,
        )
        eval_clients = sorted(open_.delivered)
        eval_ids = [secrets.token_hex(8) for _ in eval_clients]
        evaluation = replace(evaluation, tasks=dict(zip(eval_ids, eval_clients, strict=True)))
        self.store.commit_round(
            round_, checkpoint, list(open_.delivered.values()), json_state, ledger_state, evaluation
        )
        crash_point("committed")
        self.checkpoints.discard_updates(run.id)
        state.record = replace(run, committed_rounds=open_.number, strategy_state=json_state)
        if ledger_state is not None:
            state.record = replace(state.record, privacy_ledger=ledger_state)
            state.ledger = _ledger_from(ledger_state)
        model_names = set(weights)
        state.header, state.attempt = model_header(weights), 1
        state.weights = self.checkpoints.open(checkpoint, verify=False).view(model_names.__contains__)
        self.metrics.rounds_committed.inc()
        self.metrics.round_duration.observe(clock - open_.started)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - aggregation_started)
        log.info(
            "run %s round %d/%d committed: %d updates, %d examples, train_loss %s",
            run.id,
            open_.number,
            run.num_rounds,
            round_.num_clients,
            round_.num_examples,
            _fmt(round_.train_loss),
        )
        open_.phase, open_.train_seconds = EVALUATE, clock - open_.started
        open_.deadline = clock + run.round_timeout_s
        self._hand_out(state, open_, EVALUATE, eval_clients, run.client_config, task_ids=eval_ids)
        self._notify()

    def _finish_evaluation(self, state: RunState) -> None:
        open_, run = state.open, state.record
        assert open_ is not None
        results = list(open_.evaluated.values())
        examples = sum(n for n, _, _ in results)
        # Convex combinations (weights n / total), so large finite losses cannot overflow.
        loss = sum(lo * (n / examples) for n, lo, _ in results) if examples else None
        with_acc = [(n, a) for n, _, a in results if a is not None]
        acc_examples = sum(n for n, _ in with_acc)
        accuracy = sum(a * (n / acc_examples) for n, a in with_acc) if acc_examples else None
        self.store.set_round_evaluation(run.id, open_.number, loss, accuracy, len(results))
        crash_point("evaluated")
        log.info(
            "run %s round %d evaluated by %d clients: loss %s, accuracy %s",
            run.id,
            open_.number,
            len(results),
            _fmt(loss),
            _fmt(accuracy),
        )
        self._drop_open_round(state)
        if open_.number >= run.num_rounds:
            self._end_run(run.id, "completed")
        else:
            self._notify()


def _client_id_of(identity: str) -> str:
    return f"c-{identity}"


def _ledger_from(state: Mapping[str, Any]) -> PrivacyLedger:
    return PrivacyLedger.from_state({k: v for k, v in state.items() if k != "epsilon"})


def _ledger_state(ledger: PrivacyLedger | None) -> dict[str, Any]:
    """The ledger's state plus its current epsilon (cached for `run show`)."""
    return {} if ledger is None else {**ledger.state_dict(), "epsilon": ledger.epsilon()}


def _check_text(what: str, value: str, required: bool = False, limit: int = 200) -> None:
    if required and not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} characters")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
