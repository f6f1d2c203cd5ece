"""Daemon configuration: built-in defaults < TOML file (`--config`) < command-line flags."""

from __future__ import annotations

import math
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
    max_round_attempts: int = 3  # a round short of its quorum is retried with fresh clients, then the run fails
    deadline_extension: float = 0.5  # fraction of the round timeout granted once to a round short of its quorum
    upload_concurrency: int = 16  # uploads streamed at once; more are told to slow down (the SDK retries)
    shutdown_grace_s: float = 5.0
    log_level: str = "INFO"
    # TLS: `tls_dir` (from `leptonfl certs init`) supplies server.pem, server.key, ca.pem and
    # crl.pem; the single-file settings override it. Plaintext needs `insecure = true`.
    insecure: bool = False
    tls_dir: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    crl: str = ""
    # HOST:PORT of the enrollment port (server-authenticated TLS only, the Enrollment service
    # alone), where clients trade a one-time token for a certificate. Needs `tls_dir` with
    # the CA key (ca.key). Empty: off.
    enroll_address: str = ""
    enroll_rate: float = 1.0  # enrollments per second per peer address (bursts of 5)
    metrics_address: str = ""  # HOST:PORT of the Prometheus /metrics endpoint; empty: off
    log_format: str = "text"  # or "json": one JSON object per line
    join_rate: float = 2.0  # Joins per second per peer (bursts of 10)
    upload_rate: float = 2.0  # uploads per second per client (bursts of 10)
    call_rate: float = 20.0  # Fleet calls after Join per second per client (bursts of twice that)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'leptonfl.db').resolve()}"

    def tls_files(self) -> tuple[Path, Path, Path, Path | None] | None:
        """(cert, key, client CA, CRL) of the daemon, or None when none is configured."""
        base = Path(self.tls_dir) if self.tls_dir else None
        cert = Path(self.tls_cert) if self.tls_cert else (base / "server.pem" if base else None)
        key = Path(self.tls_key) if self.tls_key else (base / "server.key" if base else None)
        ca = Path(self.tls_ca) if self.tls_ca else (base / "ca.pem" if base else None)
        crl = Path(self.crl) if self.crl else (base / "crl.pem" if base else None)
        if cert is None and key is None:
            return None
        if cert is None or key is None or ca is None:
            raise ValueError("TLS needs a certificate, its key and the CA that signs client certificates")
        return cert, key, ca, crl

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
        config = replace(self, **converted)
        for name in ("join_rate", "upload_rate", "call_rate", "enroll_rate"):
            rate = getattr(config, name)
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be a positive number of calls per second, got {rate:g}")
        return config


def load_config(path: Path | None, flags: dict[str, Any]) -> ServerConfig:
    config = ServerConfig()
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        config = config.with_overrides(data.get("server", data))
    return config.with_overrides(flags)
