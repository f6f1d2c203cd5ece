"""The daemon's durable state behind one small API, returning plain frozen records.

Every method opens its own short transaction; `commit_round` writes the round row, its
participations, the checkpoint row and the strategy state in a single transaction, so a
round either counts completely or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.store.db import ensure_schema, open_engine
from server.store.models import (
    AcceptedUpdateRow,
    CheckpointRow,
    ClientRow,
    EnrollmentRow,
    OpenRoundRow,
    ParticipationRow,
    RoundRow,
    RunRow,
)

ACTIVE_STATUSES = ("pending", "running")


def now() -> datetime:
    return datetime.now(UTC)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class RunRecord:
    id: str
    name: str
    app: str
    strategy: str
    strategy_params: dict[str, Any]
    client_config: dict[str, Any]
    num_rounds: int
    clients_per_round: int
    min_clients: int
    round_timeout_s: float
    status: str
    status_reason: str
    committed_rounds: int
    strategy_state: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    privacy: dict[str, Any] = field(default_factory=dict)
    privacy_ledger: dict[str, Any] = field(default_factory=dict)
    over_selection: float = 0.0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True)
class RoundRecord:
    run_id: str
    number: int
    num_clients: int
    num_examples: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    eval_clients: int
    duration_s: float
    metrics: dict[str, Any]
    checkpoint_sha256: str = ""


@dataclass(frozen=True)
class CheckpointRecord:
    run_id: str
    round: int
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ClientRecord:
    id: str
    name: str
    app: str
    run_filter: str
    token_sha256: str


@dataclass(frozen=True)
class Participation:
    client_id: str
    num_examples: int
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class OpenRoundRecord:
    """What a restarted daemon needs to resume a run's open round (see `OpenRoundRow`)."""

    run_id: str
    number: int
    attempt: int
    phase: str
    sample_rate: float
    extended: bool
    selected: list[str]
    tasks: dict[str, str]
    evaluated: dict[str, list[Any]]
    train_seconds: float


@dataclass(frozen=True)
class AcceptedUpdate:
    run_id: str
    round: int
    client_id: str
    task_id: str
    idempotency_key: str
    num_examples: int
    metrics: Mapping[str, Any]
    path: str
    sha256: str


def _run_record(row: RunRow) -> RunRecord:
    return RunRecord(**{f: getattr(row, f) for f in RunRecord.__dataclass_fields__})


def _round_record(row: RoundRow, checkpoint_sha256: str | None = "") -> RoundRecord:
    return RoundRecord(
        run_id=row.run_id,
        number=row.number,
        num_clients=row.num_clients,
        num_examples=row.num_examples,
        train_loss=row.train_loss,
        eval_loss=row.eval_loss,
        eval_accuracy=row.eval_accuracy,
        eval_clients=row.eval_clients,
        duration_s=row.duration_s,
        metrics=dict(row.metrics),
        checkpoint_sha256=checkpoint_sha256 or "",
    )


class Store:
    """SQLAlchemy-backed state: SQLite by default, any SQLAlchemy URL (e.g. PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_engine(url)
        ensure_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return self._sessions()

    # runs -----------------------------------------------------------------------------
    def create_run(self, run: RunRecord, initial: CheckpointRecord) -> None:
        with self._session() as s, s.begin():
            s.add(RunRow(**{f: getattr(run, f) for f in RunRecord.__dataclass_fields__}))
            s.flush()
            s.add(CheckpointRow(**vars(initial), created_at=now()))

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._session() as s:
            row = s.get(RunRow, run_id)
            return _run_record(row) if row else None

    def list_runs(self, statuses: Sequence[str] | None = None) -> list[RunRecord]:
        with self._session() as s:
            query = select(RunRow).order_by(RunRow.created_at)
            if statuses:
                query = query.where(RunRow.status.in_(statuses))
            return [_run_record(r) for r in s.scalars(query)]

    def set_run_status(self, run_id: str, status: str, reason: str = "") -> None:
        """A run that ends (any status but pending/running) loses its open round with it."""
        with self._session() as s, s.begin():
            if status not in ACTIVE_STATUSES:
                _drop_open_round(s, run_id)
            s.execute(
                update(RunRow).where(RunRow.id == run_id).values(status=status, status_reason=reason, updated_at=now())
            )

    # rounds ---------------------------------------------------------------------------
    def commit_round(
        self,
        round_: RoundRecord,
        checkpoint: CheckpointRecord,
        participations: Sequence[Participation],
        strategy_state: dict[str, Any],
        privacy_ledger: dict[str, Any] | None = None,
        evaluation: OpenRoundRecord | None = None,
    ) -> None:
        """Atomically record a finished round; only committed rounds count. The round's
        accepted updates go, and its open-round row becomes `evaluation` (its evaluation
        phase) or goes too — in the same transaction."""
        with self._session() as s, s.begin():
            _drop_open_round(s, round_.run_id)
            if evaluation is not None:
                s.add(_open_round_row(evaluation))
            s.add(RoundRow(**{k: v for k, v in vars(round_).items() if k != "checkpoint_sha256"}, committed_at=now()))
            s.add(CheckpointRow(**vars(checkpoint), created_at=now()))
            for p in participations:
                s.add(
                    ParticipationRow(
                        run_id=round_.run_id,
                        round=round_.number,
                        client_id=p.client_id,
                        num_examples=p.num_examples,
                        metrics=dict(p.metrics),
                    )
                )
            values: dict[str, Any] = dict(
                committed_rounds=round_.number, strategy_state=strategy_state, updated_at=now()
            )
            if privacy_ledger is not None:
                values["privacy_ledger"] = privacy_ledger
            s.execute(update(RunRow).where(RunRow.id == round_.run_id).values(**values))

    def set_round_evaluation(
        self, run_id: str, number: int, loss: float | None, accuracy: float | None, clients: int
    ) -> None:
        """Record a round's federated evaluation; that closes the round (its open-round row goes)."""
        with self._session() as s, s.begin():
            _drop_open_round(s, run_id)
            s.execute(
                update(RoundRow)
                .where(RoundRow.run_id == run_id, RoundRow.number == number)
                .values(eval_loss=loss, eval_accuracy=accuracy, eval_clients=clients)
            )

    def rounds(self, run_id: str, since: int = 0) -> list[RoundRecord]:
        """A run's committed rounds numbered `since` or later, in order."""
        with self._session() as s:
            query = (
                select(RoundRow, CheckpointRow.sha256)
                .outerjoin(
                    CheckpointRow, (CheckpointRow.run_id == RoundRow.run_id) & (CheckpointRow.round == RoundRow.number)
                )
                .where(RoundRow.run_id == run_id, RoundRow.number >= since)
                .order_by(RoundRow.number)
            )
            return [_round_record(row, digest) for row, digest in s.execute(query).tuples()]

    def participations(self, run_id: str, number: int) -> list[Participation]:
        with self._session() as s:
            query = (
                select(ParticipationRow)
                .where(ParticipationRow.run_id == run_id, ParticipationRow.round == number)
                .order_by(ParticipationRow.client_id)
            )
            return [Participation(r.client_id, r.num_examples, dict(r.metrics)) for r in s.scalars(query)]

    def local_epsilons(self, run_id: str) -> dict[str, float]:
        """Each client's latest reported record-level (local DP) epsilon in a run."""
        with self._session() as s:
            query = select(ParticipationRow).where(ParticipationRow.run_id == run_id).order_by(ParticipationRow.round)
            return {
                r.client_id: float(r.metrics["epsilon"])
                for r in s.scalars(query)
                if isinstance(r.metrics.get("epsilon"), int | float)
            }

    def checkpoint(self, run_id: str, number: int | None = None) -> CheckpointRecord | None:
        """The checkpoint of round `number`, or the latest one when `number` is None."""
        with self._session() as s:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id)
            if number is None:
                query = query.order_by(CheckpointRow.round.desc()).limit(1)
            else:
                query = query.where(CheckpointRow.round == number)
            row = s.scalars(query).first()
            if row is None:
                return None
            return CheckpointRecord(row.run_id, row.round, row.path, row.sha256, row.size_bytes)

    # open rounds ----------------------------------------------------------------------
    def save_open_round(self, record: OpenRoundRecord) -> None:
        """Persist a newly opened round (or a new attempt, or its extended deadline)."""
        with self._session() as s, s.begin():
            existing = s.get(OpenRoundRow, record.run_id)
            if existing is not None and (existing.number, existing.attempt) != (record.number, record.attempt):
                _drop_open_round(s, record.run_id)
                s.flush()
                existing = None
            if existing is None:
                s.add(_open_round_row(record))
            else:
                s.merge(_open_round_row(record))

    def open_round(self, run_id: str) -> tuple[OpenRoundRecord, list[AcceptedUpdate]] | None:
        """A run's open round and its accepted updates (in client id order), if one is open."""
        with self._session() as s:
            row = s.get(OpenRoundRow, run_id)
            if row is None:
                return None
            record = OpenRoundRecord(
                row.run_id,
                row.number,
                row.attempt,
                row.phase,
                row.sample_rate,
                row.extended,
                list(row.selected),
                dict(row.tasks),
                dict(row.evaluated),
                row.train_seconds,
            )
            query = (
                select(AcceptedUpdateRow)
                .where(AcceptedUpdateRow.run_id == run_id, AcceptedUpdateRow.round == row.number)
                .order_by(AcceptedUpdateRow.client_id)
            )
            updates = [
                AcceptedUpdate(
                    u.run_id,
                    u.round,
                    u.client_id,
                    u.task_id,
                    u.idempotency_key,
                    u.num_examples,
                    dict(u.metrics),
                    u.path,
                    u.sha256,
                )
                for u in s.scalars(query)
            ]
            return record, updates

    def accept_update(self, update_: AcceptedUpdate) -> None:
        """Make an update durable; it counts from here on, whatever happens to the daemon."""
        with self._session() as s, s.begin():
            s.add(AcceptedUpdateRow(**vars(update_) | {"metrics": dict(update_.metrics)}, accepted_at=now()))

    def record_evaluation(self, run_id: str, client_id: str, entry: list[Any]) -> None:
        """Add one client's evaluation to the open round (the caller serialises these calls)."""
        with self._session() as s, s.begin():
            row = s.get(OpenRoundRow, run_id)
            if row is not None:
                row.evaluated = {**row.evaluated, client_id: entry}

    def drop_open_round(self, run_id: str) -> None:
        with self._session() as s, s.begin():
            _drop_open_round(s, run_id)

    # clients --------------------------------------------------------------------------
    def save_client(self, client: ClientRecord) -> None:
        with self._session() as s, s.begin():
            s.merge(ClientRow(**vars(client), joined_at=now()))

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._session() as s:
            row = s.get(ClientRow, client_id)
            if row is None:
                return None
            return ClientRecord(row.id, row.name, row.app, row.run_filter, row.token_sha256)

    # enrollment -----------------------------------------------------------------------
    def redeem_enrollment(self, token_id: str, client_name: str, serial: int) -> bool:
        """Record that a token bought the certificate `serial`; False if it was redeemed before.
        The primary key decides, so two concurrent redemptions cannot both succeed."""
        try:
            with self._session() as s, s.begin():
                s.add(
                    EnrollmentRow(token_id=token_id, client_name=client_name, serial=f"{serial:x}", enrolled_at=now())
                )
        except IntegrityError:
            return False
        return True


def _drop_open_round(s: Session, run_id: str) -> None:
    s.execute(delete(AcceptedUpdateRow).where(AcceptedUpdateRow.run_id == run_id))
    s.execute(delete(OpenRoundRow).where(OpenRoundRow.run_id == run_id))


def _open_round_row(record: OpenRoundRecord) -> OpenRoundRow:
    return OpenRoundRow(**vars(record), opened_at=now())
