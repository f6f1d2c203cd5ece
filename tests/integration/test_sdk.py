"""The client SDK against a real daemon over loopback gRPC: reconnects, typed errors, stop, re-join.

Every test uses the real `FederatedClient` / `FleetTransport` and a real in-process daemon
(SQLite in tmp_path). The model is a `Linear(2, 3)` trained on a small seeded random data set,
so a whole run takes a fraction of a second and the tests measure the SDK, not training.
Every wait is bounded: blocking `run()` calls go through `run_bounded`, background clients
through `join(timeout)`, and fixtures stop whatever a failing test left running.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import client_sdk.transport
from client_sdk import (
    Backoff,
    ClientStats,
    ConnectionFailed,
    FederatedClient,
    LeptonError,
    ProtocolMismatch,
    TorchTrainer,
    TrainingError,
)
from client_sdk.transport import FleetTransport
from protos.v1 import fleet_pb2 as pb
from server.control_client import ControlClient, status_name
from server.daemon import Daemon
from tests.conftest import start_daemon, wait_until

APP = "tiny"
FAST = Backoff(initial=0.1, maximum=0.5)


# helpers ----------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(2, 3)


def initial_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny_model(0).state_dict().items()}


def tiny_trainer(seed: int = 0) -> TorchTrainer:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g))
    return TorchTrainer(tiny_model(seed), DataLoader(data, batch_size=8), DataLoader(data, batch_size=32))


class BoomTrainer:
    """An app whose training code is broken."""

    def fit(self, weights: Any, config: Any) -> Any:
        raise ValueError("boom")

    def evaluate(self, weights: Any, config: Any) -> Any:
        raise AssertionError("a client whose training failed must not be asked to evaluate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_run(address: str, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "app": APP,
        "weights": initial_weights(),
        "num_rounds": 1,
        "clients_per_round": 1,
        "min_clients": 1,
        "round_timeout_s": 10,
        "client_config": {"lr": 0.1},
        **overrides,
    }
    with ControlClient(address, timeout=5) as control:
        return control.create_run(**settings)


def run_status(address: str, run_id: str) -> str:
    with ControlClient(address, timeout=5) as control:
        return status_name(control.get_run(run_id).run)


def run_bounded(client: FederatedClient, timeout: float) -> ClientStats:
    """`client.run()` in the caller's terms (returns or raises), but never hangs the test."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["stats"] = client.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="test-run-bounded", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        client.stop(timeout=5)
        raise AssertionError(f"run() did not return within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["stats"]


def live_sdk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith("leptonfl-")]


# fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def clients() -> Iterator[Callable[..., FederatedClient]]:
    """Factory of SDK clients; all are stopped at teardown, whatever the test did."""
    made: list[FederatedClient] = []

    def make(server: str, trainer: Any = None, **kwargs: Any) -> FederatedClient:
        kwargs.setdefault("backoff", FAST)
        client = FederatedClient(server, APP, trainer if trainer is not None else tiny_trainer(), **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop(timeout=5)


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Factory of real daemons (`start_daemon`); all still running are stopped at teardown."""
    started: list[Daemon] = []

    def make(data_dir: Path, **overrides: Any) -> Daemon:
        daemon = start_daemon(data_dir, **overrides)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop(grace=0.2)


# 1. reconnect with backoff ----------------------------------------------------------------
def test_client_started_before_the_server_connects_once_it_appears_and_trains(tmp_path, clients, daemons):
    port = free_port()
    address = f"127.0.0.1:{port}"
    trainer = tiny_trainer()
    client = clients(address, trainer, name="early")
    client.start()
    time.sleep(1.0)
    assert client.client_id == "" and client.error is None, "nothing to join yet: still retrying"

    daemon = daemons(tmp_path / "d", address=address)
    assert daemon.address == address
    run = create_run(address)
    stats = client.join(timeout=15)

    assert (stats.rounds_trained, stats.rounds_evaluated, stats.late_results) == (1, 1, 0)
    assert client.client_id.startswith("c-")
    assert run_status(address, run.run_id) == "completed"
    with ControlClient(address, timeout=5) as control:
        final = control.download(run.run_id)
    # One client per round: the committed model is that client's update, which it then evaluated.
    assert not torch.equal(final["weight"], initial_weights()["weight"])
    assert all(torch.equal(final[k], v) for k, v in trainer.model.state_dict().items())


def test_reconnect_attempts_follow_the_backoff_maximum():
    """While the server is down, the SDK must try again at least every `Backoff.maximum` (+jitter).

    The "server" here is a loopback listener that accepts and drops every TCP connection (a
    daemon that is not up yet), so the test can see each connection attempt the client makes.
    With Backoff(initial=0.1, maximum=0.5) there should be a new attempt at least every
    0.6 s; allow 1.0 s for scheduling. A longer gap means a restarted daemon is noticed late
    (the gap keeps growing with the length of the outage).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    client = FederatedClient(f"127.0.0.1:{port}", APP, tiny_trainer(), backoff=FAST)
    attempts: list[float] = []
    try:
        client.start()
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            attempts.append(time.monotonic() - started)
            conn.close()
        window_end = time.monotonic() - started
    finally:
        client.stop(timeout=5)
        listener.close()
    assert attempts, "the client never tried to connect"
    gaps = [b - a for a, b in zip(attempts, [*attempts[1:], window_end], strict=True)]
    assert max(gaps) <= 1.0, (
        f"connection attempts at {[round(t, 2) for t in attempts]} s: a gap of {max(gaps):.2f} s "
        f"although Backoff.maximum is {FAST.maximum} s"
    )


# 2. ConnectionFailed ----------------------------------------------------------------------
def test_unreachable_server_raises_connection_failed_after_the_backoff_timeout(clients):
    address = f"127.0.0.1:{free_port()}"
    backoff = Backoff(initial=0.05, maximum=0.1, timeout=0.5)

    client = clients(address, backoff=backoff)
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        run_bounded(client, timeout=10)
    elapsed = time.monotonic() - started
    error = info.value
    assert isinstance(error, LeptonError) and not isinstance(error, grpc.RpcError)
    assert error.code == "UNAVAILABLE"
    assert address in str(error)
    assert 0.5 <= elapsed < 3.0, f"gave up after {elapsed:.2f} s; should retry for 0.5 s, then stop"

    background = clients(address, backoff=backoff)
    background.start()
    with pytest.raises(ConnectionFailed):
        background.join(timeout=10)
    assert isinstance(background.error, ConnectionFailed)
    assert not background._thread.is_alive()  # type: ignore[union-attr]
    assert live_sdk_threads() == []


# 3. stop() --------------------------------------------------------------------------------
def test_stop_interrupts_a_client_waiting_for_the_server(clients):
    client = clients(f"127.0.0.1:{free_port()}", backoff=Backoff(initial=30.0, maximum=60.0, jitter=0.0))
    client.start()
    time.sleep(0.5)  # first Join refused; now in the 30 s backoff wait
    assert "leptonfl-client" in live_sdk_threads()

    started = time.monotonic()
    client.stop(timeout=10)
    elapsed = time.monotonic() - started

    assert elapsed < 2.0, f"stop() took {elapsed:.2f} s"
    assert "leptonfl-client" not in live_sdk_threads()
    assert client.error is None
    assert client.join(timeout=1) == ClientStats()


# 4. ProtocolMismatch ----------------------------------------------------------------------
def test_protocol_mismatch_is_a_typed_error_naming_both_versions(daemon, monkeypatch, clients):
    # Simulates a client built for another protocol version (the server's constant is untouched).
    monkeypatch.setattr(client_sdk.transport, "PROTOCOL_VERSION", 99)
    transport = FleetTransport(daemon.address, APP, backoff=Backoff(initial=0.05, maximum=0.1, timeout=5))
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolMismatch) as info:
            transport.join()
        assert time.monotonic() - started < 2.0, "a version mismatch must not be retried"
    finally:
        transport.close()
    message = str(info.value)
    assert "v99" in message and re.search(r"\bv1\b", message), message
    assert info.value.code == "FAILED_PRECONDITION"
    assert not isinstance(info.value, grpc.RpcError)

    with pytest.raises(ProtocolMismatch):
        run_bounded(clients(daemon.address), timeout=10)


# 5. TrainingError -------------------------------------------------------------------------
def test_trainer_exception_becomes_training_error_and_the_run_still_completes(tmp_path, clients, daemons):
    # A short liveness timeout makes the crashed client drop out of selection before the retry,
    # so the retried round deterministically goes to the healthy client.
    daemon = daemons(tmp_path / "d", heartbeat_interval_s=0.3, liveness_timeout_s=1.5)
    run = create_run(daemon.address, round_timeout_s=5)

    broken = clients(daemon.address, BoomTrainer(), name="broken")
    with pytest.raises(TrainingError) as info:
        run_bounded(broken, timeout=10)
    assert "boom" in str(info.value) and "ValueError" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    assert broken.stats == ClientStats()
    assert live_sdk_threads() == [], "no heartbeat thread may outlive the failed training"

    healthy = clients(daemon.address, name="healthy")
    healthy.start()
    stats = healthy.join(timeout=15)
    assert (stats.rounds_trained, stats.rounds_evaluated) == (1, 1)
    assert run_status(daemon.address, run.run_id) == "completed"


def test_a_failing_trainer_tells_the_server_so_the_round_does_not_wait_for_it(tmp_path, clients, daemons):
    # A long liveness timeout and round deadline: without the failure report the round would
    # wait 60 s for the second update (clients_per_round=2) and could select the failed client again.
    daemon = daemons(tmp_path / "d", heartbeat_interval_s=0.3, liveness_timeout_s=60)
    healthy, broken = clients(daemon.address, name="healthy"), clients(daemon.address, BoomTrainer(), name="broken")
    healthy.start()
    broken.start()
    wait_until(lambda: daemon.engine.online_count() == 2, 10, "both clients online")
    started = time.monotonic()
    run = create_run(daemon.address, clients_per_round=2, min_clients=1, round_timeout_s=60)
    with pytest.raises(TrainingError, match="boom"):
        broken.join(timeout=15)
    wait_until(lambda: run_status(daemon.address, run.run_id) == "completed", 15, "the run to complete")
    assert time.monotonic() - started < 20, "the round waited for the failed client"
    with ControlClient(daemon.address) as control:
        (summary,) = control.get_run(run.run_id).rounds
    assert summary.num_clients == 1 and summary.eval_clients == 1
    assert daemon.metrics.client_failures.labels(kind="train")._value.get() == 1
    assert healthy.join(timeout=10).rounds_trained == 1


def test_failure_reports_are_checked_and_counted_once(tmp_path, daemons):
    daemon = daemons(tmp_path / "d")
    transport = FleetTransport(daemon.address, APP, name="reporter", backoff=FAST)
    try:
        transport.join()
        create_run(daemon.address, round_timeout_s=60)
        wait_until(lambda: transport.get_task().HasField("task") or None, 10, "a task")
        task = daemon.engine.get_task(transport.client_id)
        stub, metadata = transport._stub, transport._metadata()

        def report(**fields: Any) -> grpc.StatusCode:
            request = pb.FailureReport(task_id=task.task_id, run_id=task.run_id, round=task.round, reason="oom")
            for name, value in fields.items():
                setattr(request, name, value)
            try:
                stub.ReportFailure(request, metadata=metadata, timeout=5)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert report(reason="x" * 1001) == grpc.StatusCode.INVALID_ARGUMENT
        assert report(task_id="0" * 16) == grpc.StatusCode.FAILED_PRECONDITION  # not a task of this daemon
        assert report(round=task.round + 1) == grpc.StatusCode.PERMISSION_DENIED  # not what it was assigned
        assert daemon.metrics.client_failures.labels(kind="train")._value.get() == 0  # nothing spent by those
        assert report() == grpc.StatusCode.OK
        assert report() == grpc.StatusCode.OK  # a repeat is acknowledged...
        assert daemon.metrics.client_failures.labels(kind="train")._value.get() == 1  # ...and counted once
        assert transport.report_failure(pb.Task(task_id="0" * 16, run_id=task.run_id, round=1), "x") is False
        # The SDK cuts a long reason (a traceback, say) to what the daemon takes, so it is not refused.
        own = pb.Task(task_id=task.task_id, run_id=task.run_id, round=task.round)
        assert transport.report_failure(own, "x" * 5000) is True
    finally:
        transport.close()


def test_the_sdk_rides_out_the_daemons_call_limit(tmp_path, clients, daemons):
    # 2 calls a second (bursts of 10): below the SDK's idle polling rate, so it is throttled
    # ("slow down", RESOURCE_EXHAUSTED) and must back off and carry on, not fail.
    daemon = daemons(tmp_path / "d", call_rate=2.0)
    client = clients(daemon.address, name="patient")
    client.start()
    wait_until(lambda: daemon.engine.online_count() == 1, 10, "the client online")
    throttled = daemon.metrics.rpc_rejections.labels("GetTask", "RESOURCE_EXHAUSTED")
    wait_until(lambda: throttled._value.get() > 0, 20, "idle polls to use up the burst")
    create_run(daemon.address, num_rounds=2)
    stats = client.join(timeout=60)
    assert (stats.rounds_trained, stats.rounds_evaluated) == (2, 2)


# 6. transparent re-join -------------------------------------------------------------------
def test_client_joins_again_when_a_fresh_server_does_not_know_it(tmp_path, clients, daemons):
    first = daemons(tmp_path / "a")
    address = first.address
    client = clients(address, name="survivor")
    client.start()
    wait_until(lambda: client.client_id, 5, "the first join")
    old_id = client.client_id
    time.sleep(0.6)  # at least one idle GetTask poll on the first server

    first.stop(grace=0.2)
    second = daemons(tmp_path / "b", address=address)  # fresh data dir: no record of old_id
    assert second.address == address
    run = create_run(address)

    stats = client.join(timeout=15)
    assert (stats.rounds_trained, stats.rounds_evaluated) == (1, 1)
    assert client.client_id.startswith("c-") and client.client_id != old_id
    assert run_status(address, run.run_id) == "completed"


def test_client_keeps_its_identity_across_a_restart_on_the_same_data_dir(tmp_path, clients, daemons):
    first = daemons(tmp_path / "d")
    address = first.address
    client = clients(address, name="steady")
    client.start()
    wait_until(lambda: client.client_id, 5, "the first join")
    old_id = client.client_id

    first.stop(grace=0.2)
    daemons(tmp_path / "d", address=address)  # same data dir: the client record survives
    run = create_run(address)

    stats = client.join(timeout=15)
    assert (stats.rounds_trained, stats.rounds_evaluated) == (1, 1)
    assert client.client_id == old_id
    assert run_status(address, run.run_id) == "completed"


# 7. exit_when_idle and run_id -------------------------------------------------------------
def test_exit_when_idle_ends_after_the_run_and_a_finished_run_id_returns_at_once(daemon, clients):
    run = create_run(daemon.address, clients_per_round=2, min_clients=2)
    one_shot = clients(daemon.address, tiny_trainer(1), name="one-shot", exit_when_idle=True)
    serving = clients(daemon.address, tiny_trainer(2), name="serving", exit_when_idle=False)
    one_shot.start()
    serving.start()

    stats = one_shot.join(timeout=15)
    assert (stats.rounds_trained, stats.rounds_evaluated) == (1, 1)
    assert not one_shot._thread.is_alive()  # type: ignore[union-attr]
    assert run_status(daemon.address, run.run_id) == "completed"
    # The other client took part too, but keeps serving future runs until stopped.
    time.sleep(1.2)  # more than two idle polls (retry_after 500 ms)
    assert serving._thread.is_alive() and serving.error is None  # type: ignore[union-attr]
    serving.stop(timeout=5)
    assert not serving._thread.is_alive()  # type: ignore[union-attr]
    assert (serving.stats.rounds_trained, serving.stats.rounds_evaluated) == (1, 1)

    # Pinned to the run that has ended: run() returns at once, even without exit_when_idle.
    pinned = clients(daemon.address, run_id=run.run_id, exit_when_idle=False)
    started = time.monotonic()
    assert run_bounded(pinned, timeout=10) == ClientStats()
    assert time.monotonic() - started < 2.0
