"""gRPC backend: the real daemon (a child process) on a free loopback port, and N real SDK
clients — each with its own channel, trainer and data partition — in threads of this
process. Nothing is mocked: this is the production path on one machine.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from client_sdk import FederatedClient, TorchTrainer
from protos.v1 import control_pb2
from server.control_client import ControlClient, ControlError, status_name
from simulations.apps import App, loader
from simulations.config import SimulationConfig
from simulations.inprocess import client_seed
from simulations.report import RoundRecord

log = logging.getLogger("leptonfl.sim")
LISTENING = re.compile(r"listening on (\S+)")


class DaemonProcess:
    """`leptonfl server start` as a child process; its log goes to `log_path`."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.args = [
            sys.executable,
            "-m",
            "leptonfl",
            "server",
            "start",
            "--address",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--insecure",  # loopback only: the harness and its clients share this machine
            # All virtual clients join from 127.0.0.1, which plaintext mode rate-limits as one
            # peer: let a whole population join at once instead of queueing behind the limit.
            "--join-rate",
            "1000",
            *(extra_args or []),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 60.0) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.args, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.address = match.group(1)
                return self.address
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the daemon did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def run_grpc(
    app: App, config: SimulationConfig, on_round: Callable[[RoundRecord], None]
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    # The daemon's state is this simulation's scratch space: start from an empty one each time.
    shutil.rmtree(config.out / "daemon", ignore_errors=True)
    daemon = DaemonProcess(
        config.out / "daemon", config.out / "daemon.log", ["--selection-grace", "1", "--liveness-timeout", "60"]
    )
    address = daemon.start()
    log.info(
        "daemon started on %s: plaintext on loopback (--insecure), for this one machine only (log: %s)",
        address,
        daemon.log_path,
    )
    clients: list[FederatedClient] = []
    try:
        client_config = {**app.default_config, **config.client_config}
        with ControlClient(address) as control:
            run = control.create_run(
                app=app.name,
                weights=app.initial_weights(config.seed),
                num_rounds=config.rounds,
                clients_per_round=config.per_round,
                min_clients=config.per_round,
                round_timeout_s=config.round_timeout_s,
                strategy=config.strategy,
                strategy_params=config.strategy_params,
                client_config=client_config,
                name=f"sim seed {config.seed}",
                privacy=config.privacy,
            )
            dp = config.privacy.enabled
            for index in range(config.clients):
                clients.append(_start_client(app, config, address, run.run_id, index, client_config))
            watchdog = threading.Thread(
                target=_cancel_if_clients_died, args=(address, run.run_id, clients), daemon=True
            )
            watchdog.start()
            reported: set[int] = set()
            for event in control.watch(run.run_id):
                if event.HasField("round") and event.round.eval_clients and event.round.round not in reported:
                    reported.add(event.round.round)
                    on_round(record_from_summary(event.round, dp))
            detail = control.get_run(run.run_id)
            if status_name(detail.run) not in ("completed", "budget_exhausted"):
                raise RuntimeError(
                    f"run {run.run_id} ended {status_name(detail.run)}: {detail.run.status_reason} "
                    f"(daemon log: {daemon.log_path})"
                )
            records = [record_from_summary(r, dp) for r in detail.rounds]
            for record in records:
                if record.round not in reported:
                    on_round(record)
            return records, control.download(run.run_id)
    finally:
        for client in clients:
            client.stop()
        code = daemon.stop()
        log.info("daemon stopped (exit code %s)", code)


def _cancel_if_clients_died(address: str, run_id: str, clients: list[FederatedClient]) -> None:
    """If every simulated client has stopped (an error, not the run's end), cancel the run so the
    simulation fails at once with the reason instead of waiting out its round deadlines."""
    while any(c.running for c in clients):
        time.sleep(0.5)
    errors = [c.error for c in clients if c.error is not None]
    if errors:
        with ControlClient(address) as control:
            try:
                control.cancel_run(run_id, f"all {len(clients)} simulated clients stopped; first error: {errors[0]}")
            except ControlError:
                pass  # the run had already ended


def _start_client(
    app: App, config: SimulationConfig, address: str, run_id: str, index: int, client_config: dict[str, object]
) -> FederatedClient:
    train, test = app.partition(index, config.clients, config.partition, config.seed)
    batch_size = int(client_config.get("batch_size", 32))  # type: ignore[call-overload]
    torch.manual_seed(config.seed)
    trainer = TorchTrainer(
        app.build_model(),
        loader(train, batch_size, True, client_seed(config.seed, 0, index)),
        loader(test, 256, False, 0),
        optimizer=app.make_optimizer,
        loss_fn=app.loss_fn,
    )
    client = FederatedClient(address, app.name, trainer, name=f"sim-{index}", run_id=run_id)
    client.start()
    return client


def record_from_summary(r: control_pb2.RoundSummary, central_dp: bool = False) -> RoundRecord:
    """A daemon's round summary as a report row (with epsilon and clip norm under central DP)."""
    return RoundRecord(
        round=r.round,
        num_clients=r.num_clients,
        num_examples=r.num_examples,
        train_loss=r.train_loss,
        eval_loss=r.eval_loss,
        eval_accuracy=r.eval_accuracy,
        duration_seconds=r.duration_seconds,
        extra={"epsilon": r.epsilon, "clip_norm": r.clip_norm} if central_dp else {},
    )
