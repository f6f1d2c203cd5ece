"""Daemon configuration: built-in defaults < TOML file (`--config`) < command-line flags."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9721
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
SERVER_ENV = "LEPTONFL_SERVER"


def default_server() -> str:
    """Where CLI commands connect: `$LEPTONFL_SERVER`, else 127.0.0.1:9721."""
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


@dataclass(frozen=True)
class ServerConfig:
    """Everything `leptonfl server start` can be told; see docs/operator.md."""

    # Loopback by default: listening on a public interface is an explicit decision.
    address: str = DEFAULT_SERVER
    data_dir: Path = Path("leptonfl-data")
    db: str = ""  # SQLAlchemy URL; empty means sqlite:///<data_dir>/leptonfl.db
    max_workers: int = 32
    chunk_bytes: int = 1 << 20
    max_update_bytes: int = 2 << 30
    heartbeat_interval_s: float = 5.0
    liveness_timeout_s: float = 30.0
    selection_grace_s: float = 3.0
    max_round_attempts: int = 3
    shutdown_grace_s: float = 5.0
    log_level: str = "INFO"

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'leptonfl.db').resolve()}"

    def with_overrides(self, values: dict[str, Any]) -> ServerConfig:
        """Apply non-None values, converting types as the field declares and refusing unknown keys."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown server setting(s) {unknown}; known: {sorted(known)}")
        converted: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            default = getattr(self, key)
            converted[key] = Path(value) if isinstance(default, Path) else type(default)(value)
        return replace(self, **converted)


def load_config(path: Path | None, flags: dict[str, Any]) -> ServerConfig:
    config = ServerConfig()
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        config = config.with_overrides(data.get("server", data))
    return config.with_overrides(flags)
