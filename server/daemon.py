"""The long-lived daemon: wires store, checkpoints, engine and servicers to a gRPC server.

`run_daemon` runs in the foreground (for systemd and containers) and exits 0 on SIGTERM
or SIGINT: it stops accepting RPCs, gives in-flight ones a short grace, abandons the open
round (it restarts after the next start) and closes the database.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.v1 import control_pb2_grpc, enrollment_pb2_grpc, fleet_pb2_grpc
from server.auth import Authorizer
from server.checkpoints import CheckpointStore
from server.config import ServerConfig
from server.engine import EngineConfig, RoundEngine
from server.memory import tune_malloc
from server.metrics import DaemonMetrics
from server.servicers.control import ControlServicer
from server.servicers.enrollment import EnrollmentServicer
from server.servicers.fleet import FleetServicer
from server.store import Store

log = logging.getLogger("leptonfl.daemon")

# Chunks are at most a few MiB; nothing else is large. Bounded so one message can't hog memory.
MAX_MESSAGE_BYTES = 16 << 20
# Clients may send keepalive pings this often on an idle connection (the SDK pings every 20 s
# during long local training); faster pingers get GOAWAY "too_many_pings".
MIN_CLIENT_PING_INTERVAL_MS = 10_000


class Daemon:
    """A running aggregation server; `start()` binds and returns the actual address."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tls = config.tls_files()
        if self.tls is None and not config.insecure:
            raise ValueError(
                "no TLS certificate configured: pass --tls-dir DIR (made by `leptonfl certs init DIR`), or "
                "--insecure to serve plaintext on a trusted network"
            )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.db_url)
        engine_config = EngineConfig(
            heartbeat_interval_s=config.heartbeat_interval_s,
            liveness_timeout_s=config.liveness_timeout_s,
            selection_grace_s=config.selection_grace_s,
            max_round_attempts=config.max_round_attempts,
            max_update_bytes=config.max_update_bytes,
            deadline_extension=config.deadline_extension,
            upload_concurrency=config.upload_concurrency,
        )
        self.metrics = DaemonMetrics()
        self.engine = RoundEngine(self.store, CheckpointStore(config.data_dir), engine_config, self.metrics)
        self.metrics.track(self.engine.online_count, self.engine.active_run_count)
        self.metrics_port: int | None = None
        authorizer = Authorizer(self.tls is not None, *(self.tls[2:] if self.tls else ()))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Clients may ping every 20 s during long local training without being cut off.
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.keepalive_permit_without_calls", 1),
                # A second daemon on a taken port must fail to start, not share (split) its clients.
                ("grpc.so_reuseport", 0),
            ],
        )
        fleet = FleetServicer(
            self.engine, config.chunk_bytes, authorizer, config.join_rate, config.upload_rate, config.call_rate
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(fleet, self._server)
        control = ControlServicer(self.engine, config.chunk_bytes, authorizer)
        control_pb2_grpc.add_ControlServicer_to_server(control, self._server)
        # The standard gRPC health service, for load balancers and `leptonfl server status`.
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.address = ""
        self.enroll_address = ""
        self._enroll_server = self._enrollment_server() if config.enroll_address else None

    def _enrollment_server(self) -> grpc.Server:
        """A second server for the Enrollment service alone: its callers have no certificate yet."""
        if self.tls is None or not self.config.tls_dir:
            raise ValueError("--enroll-address needs --tls-dir: the certificates dir whose CA key signs enrollments")
        if not (Path(self.config.tls_dir) / "ca.key").exists():
            raise ValueError(
                f"--enroll-address needs the CA key {Path(self.config.tls_dir) / 'ca.key'} to sign client "
                "certificates (see docs/security.md#enrollment-tokens); without it, provision clients offline"
            )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="enroll"),
            options=[("grpc.max_receive_message_length", 64 << 10), ("grpc.so_reuseport", 0)],
        )
        servicer = EnrollmentServicer(self.store, Path(self.config.tls_dir), self.metrics, self.config.enroll_rate)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(servicer, server)
        return server

    def start(self) -> str:
        host, _, _ = self.config.address.rpartition(":")
        if self.tls is None:
            credentials = None
        else:
            cert, key, ca, _ = self.tls
            credentials = grpc.ssl_server_credentials(
                [(key.read_bytes(), cert.read_bytes())], root_certificates=ca.read_bytes(), require_client_auth=True
            )
        self.address = f"{host}:{_listen(self._server, self.config.address, credentials)}"
        if self.tls is None:
            log.warning(
                "serving PLAINTEXT gRPC without authentication (--insecure): anyone who can reach %s can join "
                "and operate runs; use only on loopback or a trusted network",
                self.address,
            )
        self._server.start()
        if self._enroll_server is not None:
            self.enroll_address = self._start_enrollment()
        self.engine.start()
        for service in ("", "leptonfl.v1.Fleet", "leptonfl.v1.Control"):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_address:
            self.metrics_port = self.metrics.serve(self.config.metrics_address)
            log.info(
                "metrics at http://%s:%d/metrics", self.config.metrics_address.rpartition(":")[0], self.metrics_port
            )
        log.info(
            "leptonfl daemon (%s) listening on %s (data dir %s, db %s)",
            "mutual TLS" if self.tls else "plaintext",
            self.address,
            self.config.data_dir,
            _redact(self.config.db_url),
        )
        return self.address

    def _start_enrollment(self) -> str:
        assert self.tls is not None and self._enroll_server is not None
        cert, key, _, _ = self.tls
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        port = _listen(self._enroll_server, self.config.enroll_address, credentials)
        self._enroll_server.start()
        address = f"{self.config.enroll_address.rpartition(':')[0]}:{port}"
        log.info("enrollment (one-time tokens for client certificates) on %s", address)
        return address

    def stop(self, grace: float | None = None) -> None:
        grace = self.config.shutdown_grace_s if grace is None else grace
        log.info("stopping: no new RPCs, %.0f s grace for in-flight ones", grace)
        self.health.enter_graceful_shutdown()
        if self._enroll_server is not None:
            self._enroll_server.stop(0)
        done = self._server.stop(grace)
        self.engine.stop()
        done.wait(grace + 1)
        self.store.close()
        log.info("stopped")


def _listen(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` (port 0: any free one) and return the port; OSError when it is taken."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # what grpcio raises when bind() fails
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def _redact(url: str) -> str:
    """Hide a password in a database URL before logging it."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def run_daemon(config: ServerConfig) -> int:
    """Run in the foreground until SIGTERM/SIGINT; returns the process exit code."""
    tune_malloc()
    daemon = Daemon(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    stop.wait()
    daemon.stop()
    return 0
