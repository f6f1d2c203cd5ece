"""Durable daemon state: SQLAlchemy models, Alembic migrations, and the `Store` API."""

from server.store.db import SchemaError, migrate
from server.store.store import (
    ACTIVE_STATUSES,
    AcceptedUpdate,
    CheckpointRecord,
    ClientRecord,
    OpenRoundRecord,
    Participation,
    RoundRecord,
    RunRecord,
    Store,
    now,
    token_digest,
)

__all__ = [
    "ACTIVE_STATUSES",
    "AcceptedUpdate",
    "CheckpointRecord",
    "ClientRecord",
    "OpenRoundRecord",
    "Participation",
    "RoundRecord",
    "RunRecord",
    "SchemaError",
    "Store",
    "migrate",
    "now",
    "token_digest",
]
