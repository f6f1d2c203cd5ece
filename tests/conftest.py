"""Shared fixtures: a real daemon on a free loopback port with a real SQLite file."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from server.config import ServerConfig
from server.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
DIGITS_APP = str(ROOT / "examples" / "digits")


def start_daemon(data_dir: Path, **overrides: object) -> Daemon:
    settings: dict[str, object] = {
        "insecure": True,
        # Tests fire many calls per second on purpose; rate limits have their own test.
        "join_rate": 1000.0,
        "upload_rate": 1000.0,
        "call_rate": 1000.0,
        "address": "127.0.0.1:0",
        "data_dir": data_dir,
        "selection_grace_s": 0.5,
        "shutdown_grace_s": 1.0,
        **overrides,
    }
    daemon = Daemon(ServerConfig().with_overrides(settings))
    daemon.start()
    return daemon


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "data")
    yield d
    d.stop(grace=0.5)


def tiny_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2-tensor model small enough to hand-check aggregation over the wire."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.zeros(3)}


# Databases the persistence tests run against: SQLite always; PostgreSQL too when
# LEPTONFL_TEST_POSTGRES_URL names a server (CI starts one with .ci/postgres.sh).
POSTGRES_URL = os.environ.get("LEPTONFL_TEST_POSTGRES_URL", "")
DATABASES = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    import sqlalchemy as sa

    name = f"leptonfl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
