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

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.store.db import ensure_schema, open_engine
from server.store.models import CheckpointRow, ClientRow, ParticipationRow, RoundRow, RunRow

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


def _run_record(row: RunRow) -> RunRecord:
    return RunRecord(**{f: getattr(row, f) for f in RunRecord.__dataclass_fields__})


def _round_record(row: RoundRow) -> RoundRecord:
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
        with self._session() as s, s.begin():
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
    ) -> None:
        """Atomically record a finished round; only committed rounds count."""
        with self._session() as s, s.begin():
            s.add(RoundRow(**vars(round_), committed_at=now()))
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
        with self._session() as s, s.begin():
            s.execute(
                update(RoundRow)
                .where(RoundRow.run_id == run_id, RoundRow.number == number)
                .values(eval_loss=loss, eval_accuracy=accuracy, eval_clients=clients)
            )

    def rounds(self, run_id: str) -> list[RoundRecord]:
        with self._session() as s:
            query = select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.number)
            return [_round_record(r) for r in s.scalars(query)]

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
