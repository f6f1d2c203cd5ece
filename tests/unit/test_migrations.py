"""Alembic migrations build exactly the schema the models describe, upgrade old data in
place, and a schema newer than the code is refused — on SQLite, and on PostgreSQL in CI."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from server.store import SchemaError, Store
from server.store.db import MIGRATIONS_DIR, current_revision, ensure_schema, head_revision, migrate, open_engine
from server.store.models import Base


def test_migrations_match_the_models(db_url: str) -> None:
    engine = open_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_upgrade_keeps_existing_runs(db_url: str) -> None:
    engine = open_engine(db_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(
            sa.text(
                "INSERT INTO runs VALUES ('run-old', '', 'digits', 'fedavg', '{}', '{}', 3, 2, 2, 60.0, 'completed', "
                "'', 3, '{}', '2026-01-01 00:00:00+00', '2026-01-01 00:00:00+00')"
            )
        )
    with pytest.raises(SchemaError, match="leptonfl server migrate"):
        ensure_schema(engine)
    before, after = migrate(engine)
    assert (before, after) == ("0001", head_revision())
    engine.dispose()
    store = Store(db_url)
    run = store.get_run("run-old")
    assert run is not None and run.status == "completed" and run.privacy == {} and run.privacy_ledger == {}
    store.close()


def test_a_newer_schema_is_refused(db_url: str) -> None:
    engine = open_engine(db_url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer than this daemon knows"):
        Store(db_url)
