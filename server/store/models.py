"""SQLAlchemy tables of the daemon's state. Schema changes go through Alembic migrations
(`server/migrations/versions`); `tests/unit/test_migrations.py` checks they agree."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    app: Mapped[str] = mapped_column(String(200), index=True)
    strategy: Mapped[str] = mapped_column(String(64))
    strategy_params: Mapped[dict[str, Any]]
    client_config: Mapped[dict[str, Any]]
    num_rounds: Mapped[int] = mapped_column(Integer)
    clients_per_round: Mapped[int] = mapped_column(Integer)
    min_clients: Mapped[int] = mapped_column(Integer)
    round_timeout_s: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32), index=True)
    status_reason: Mapped[str] = mapped_column(String(2000), default="")
    committed_rounds: Mapped[int] = mapped_column(Integer, default=0)
    strategy_state: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    privacy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    privacy_ledger: Mapped[dict[str, Any]] = mapped_column(default=dict)
    over_selection: Mapped[float] = mapped_column(Float, default=0.0)


class RoundRow(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    num_clients: Mapped[int] = mapped_column(Integer)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_clients: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]]
    committed_at: Mapped[datetime]


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class ClientRow(Base):
    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    app: Mapped[str] = mapped_column(String(200))
    run_filter: Mapped[str] = mapped_column(String(64), default="")
    token_sha256: Mapped[str] = mapped_column(String(64))
    joined_at: Mapped[datetime]


class ParticipationRow(Base):
    """Which clients delivered what in a committed round (written with the round)."""

    __tablename__ = "participations"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]]


class OpenRoundRow(Base):
    """The round a run has open, so a restarted daemon resumes it with the same clients and
    tasks. Replaced when the round moves to its evaluation phase (in the commit transaction)
    and deleted when the round is finished, fails, or its run ends."""

    __tablename__ = "open_rounds"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    sample_rate: Mapped[float] = mapped_column(Float)
    extended: Mapped[bool] = mapped_column(Boolean)
    selected: Mapped[list[str]] = mapped_column(JSON)
    tasks: Mapped[dict[str, Any]]  # task id -> client id, of the current phase
    evaluated: Mapped[dict[str, Any]]  # client id -> [examples, loss, accuracy, idempotency key]
    train_seconds: Mapped[float] = mapped_column(Float)
    opened_at: Mapped[datetime]


class AcceptedUpdateRow(Base):
    """An update of the open round, durable (file fsynced, row committed) before the client
    hears "accepted"; folded again from its file after a restart. Deleted with its round."""

    __tablename__ = "accepted_updates"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]]
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    accepted_at: Mapped[datetime]


class EnrollmentRow(Base):
    """An enrollment token that has been redeemed (its certificate's serial in hex): a
    token's id may appear once, which is what makes each token single-use."""

    __tablename__ = "enrollments"

    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_name: Mapped[str] = mapped_column(String(64))
    serial: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[datetime]
