"""`kill -9` the daemon at seeded points of a run, restart it on the same data dir, and the
run completes exactly as the uninterrupted run of the same seeds: the same clients and
accepted-update counts in every committed round, no update counted twice, and the same
final model (max abs difference ≤ 1e-5).

Real processes: the daemon is `leptonfl server start` in a subprocess, SIGKILLed by itself
at the seeded crash point (`LEPTONFL_CRASH_AT`, see `server.faults`) — mid-download,
mid-upload, right after an update became durable, mid-aggregation, between checkpoint
file and commit, after the commit, mid-evaluation — and restarted on the same port, data
dir and database (in this process: a real daemon, without a second interpreter start-up
per scenario); four SDK clients over real gRPC ride through the outage with their retries.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from client_sdk import Backoff, FederatedClient
from client_sdk.training import EvalResult, FitResult
from server.control_client import ControlClient, status_name
from server.daemon import Daemon
from server.store import Store
from tests.conftest import ROOT, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLIENTS, ROUNDS, FEATURES, OUTPUTS = 4, 3, 128, 256
# Spread over the three rounds. Per round: 8 downloads of 4 messages (header + 3 chunks of
# 64 KiB), 4 uploads of 3 chunks, 4 accepted updates, 1 aggregation, 1 checkpoint, 1 commit,
# 4 evaluation reports, 1 evaluation record.
KILL_POINTS = [
    "download:2",
    "download:21",
    "download:45",
    "download:90",
    "upload:1",
    "upload:14",
    "upload:29",
    "accepted:1",
    "accepted:4",
    "accepted:6",
    "accepted:11",
    "aggregate:1",
    "aggregate:2",
    "aggregate:3",
    "checkpoint:1",
    "checkpoint:3",
    "committed:2",
    "committed:3",
    "evaluation:3",
    "evaluation:9",
    "evaluated:1",
    "evaluated:3",
]


class LeastSquares:
    """A deterministic client: one gradient step on its own least-squares problem.

    Its update depends only on the global weights it is given and its index, so an
    interrupted run must reproduce the uninterrupted one exactly (up to summation order).
    """

    def __init__(self, index: int) -> None:
        g = torch.Generator().manual_seed(1000 + index)
        self.examples = 10 + 3 * index
        self.x = torch.randn(self.examples, FEATURES, generator=g)
        self.y = torch.randn(self.examples, OUTPUTS, generator=g)

    def _loss_and_grads(self, weights: Mapping[str, torch.Tensor]) -> tuple[float, torch.Tensor, torch.Tensor]:
        residual = self.x @ weights["w"] + weights["b"] - self.y
        grad_w = self.x.T @ residual / self.examples
        return float((residual**2).mean()), grad_w, residual.mean(dim=0)

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        loss, grad_w, grad_b = self._loss_and_grads(weights)
        lr = float(config.get("lr", 0.05))
        new = {"w": weights["w"] - lr * grad_w, "b": weights["b"] - lr * grad_b}
        return FitResult(new, self.examples, {"train_loss": loss})

    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> EvalResult:
        loss, _, _ = self._loss_and_grads(weights)
        return EvalResult(self.examples, loss, {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outcome:
    rounds: list[tuple[int, int, int]]  # (number, updates, examples) per committed round
    participants: list[list[str]]  # client names per committed round
    weights: dict[str, torch.Tensor]
    crashed: bool


class Scenario:
    """One daemon data dir and port, restarted as often as the scenario needs."""

    def __init__(self, root: Path, db_url: str) -> None:
        self.root, self.db_url, self.port = root, db_url, _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115 - closed in close()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarted: Daemon | None = None

    def start(self, crash_at: str = "") -> None:
        env = {k: v for k, v in os.environ.items() if k != "LEPTONFL_CRASH_AT"}
        if crash_at:
            env["LEPTONFL_CRASH_AT"] = crash_at
        self.log.write(f"--- start (crash at {crash_at or 'never'})\n".encode())
        self.log.flush()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "leptonfl",
                "server",
                "start",
                "--insecure",
                "--address",
                self.address,
                "--data-dir",
                str(self.root / "data"),
                "--db",
                self.db_url,
                "--selection-grace",
                "0.2",
                "--join-rate",
                "1000",
                "--upload-rate",
                "1000",
                "--chunk-bytes",
                str(64 << 10),
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:  # a fresh channel per try: a failed one waits out gRPC's reconnect backoff
            try:
                with ControlClient(self.address, timeout=2.0) as control:
                    control.list_runs()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon did not start; see {self.root / 'daemon.log'}") from None
                time.sleep(0.05)

    def restart(self) -> None:
        """The daemon again, on the same port, data dir and database."""
        self.restarted = start_daemon(
            self.root / "data",
            address=self.address,
            db=self.db_url,
            selection_grace_s=0.2,
            chunk_bytes=64 << 10,
        )

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.restarted is not None:
            self.restarted.stop(grace=0.5)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.log.close()


def _initial_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(FEATURES, OUTPUTS, generator=g) * 0.1, "b": torch.zeros(OUTPUTS)}


def _clients(address: str, run_id: str) -> list[FederatedClient]:
    return [
        FederatedClient(
            address,
            "crash-test",
            LeastSquares(i),
            name=f"client-{i}",
            run_id=run_id,
            backoff=Backoff(initial=0.1, maximum=0.5, timeout=120),
            chunk_bytes=64 << 10,
        )
        for i in range(CLIENTS)
    ]


def run_scenario(root: Path, db_url: str, crash_at: str = "") -> Outcome:
    scenario = Scenario(root, db_url)
    clients: list[FederatedClient] = []
    try:
        scenario.start(crash_at)
        with ControlClient(scenario.address) as control:
            run_id = control.create_run(
                app="crash-test",
                weights=_initial_weights(),
                num_rounds=ROUNDS,
                clients_per_round=CLIENTS,
                min_clients=CLIENTS,
                round_timeout_s=120,
                client_config={"lr": 0.05},
            ).run_id
        clients = _clients(scenario.address, run_id)
        for client in clients:
            client.start()
        crashed = False
        if crash_at:
            code = scenario.wait_exit(timeout=120)
            assert code == -9, f"the daemon never reached crash point {crash_at} (exit {code})"
            crashed = True
            scenario.restart()
        for client in clients:
            client.join(timeout=180)
            assert not client.running, "a client did not finish"
        with ControlClient(scenario.address) as control:
            detail = control.get_run(run_id)
            assert status_name(detail.run) == "completed", detail.run.status_reason
            weights = control.download(run_id)
        names = {c.client_id: f"client-{i}" for i, c in enumerate(clients)}
        store = Store(db_url)
        try:
            rounds = [(r.number, r.num_clients, r.num_examples) for r in store.rounds(run_id)]
            participants = [
                sorted(names[p.client_id] for p in store.participations(run_id, number)) for number, _, _ in rounds
            ]
        finally:
            store.close()
        return Outcome(rounds, participants, weights, crashed)
    finally:
        for client in clients:
            client.stop(timeout=5)
        scenario.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    root = tmp_path_factory.mktemp("uninterrupted")
    return run_scenario(root, f"sqlite:///{root / 'state.db'}")


def test_uninterrupted_run_is_complete(uninterrupted: Outcome) -> None:
    examples = sum(10 + 3 * i for i in range(CLIENTS))
    assert uninterrupted.rounds == [(n, CLIENTS, examples) for n in range(1, ROUNDS + 1)]
    assert uninterrupted.participants == [[f"client-{i}" for i in range(CLIENTS)]] * ROUNDS
    assert float(uninterrupted.weights["w"].abs().sum()) > 0


@pytest.fixture
def scenario_db(db_url: str) -> Iterator[str]:
    yield db_url


@pytest.mark.parametrize("crash_at", KILL_POINTS)
def test_kill_9_and_restart_matches_the_uninterrupted_run(
    crash_at: str, scenario_db: str, uninterrupted: Outcome, tmp_path: Path
) -> None:
    outcome = run_scenario(tmp_path, scenario_db, crash_at)
    assert outcome.crashed
    assert outcome.rounds == uninterrupted.rounds  # same updates and examples: nothing lost, nothing twice
    assert outcome.participants == uninterrupted.participants
    diff = max(float((outcome.weights[k] - uninterrupted.weights[k]).abs().max()) for k in uninterrupted.weights)
    assert diff <= 1e-5, f"final model differs by {diff}"
