"""Opening the database and keeping its schema in step with the code (Alembic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class SchemaError(RuntimeError):
    """The database schema is not the one this version of the daemon knows."""


def open_engine(url: str) -> Engine:
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers (run show, watchers) proceed during a commit; FULL sync
            # makes a committed round survive power loss, not only a process crash.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    return engine


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Upgrade the schema to the newest revision; returns (before, after)."""
    before = current_revision(engine)
    _refuse_unknown(before)
    config = _alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    return before, head_revision()


def ensure_schema(engine: Engine) -> None:
    """Create a fresh database; refuse an older or newer schema with a clear message."""
    revision = current_revision(engine)
    if revision is None:
        migrate(engine)
        return
    _refuse_unknown(revision)
    if revision != head_revision():
        raise SchemaError(
            f"database schema is at revision {revision}, this daemon needs {head_revision()}: "
            "back up the data dir, then run `leptonfl server migrate`"
        )


def _refuse_unknown(revision: str | None) -> None:
    if revision is None:
        return
    script = ScriptDirectory.from_config(_alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    if revision not in known:
        raise SchemaError(
            f"database schema revision {revision} is newer than this daemon knows "
            f"(newest known: {head_revision()}); upgrade leptonfl before starting it on this data"
        )
