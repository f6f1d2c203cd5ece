"""Stragglers and dropouts against the real daemon and real SDK clients over loopback gRPC.

* Dropouts: 20 clients, 30 % of them vanish mid-round (inside local training, at seeded
  rounds) and never come back; with over-selection every round still completes by its
  deadline with its quorum, and slow clients hear "round closed" without failing.
* Long local training (longer than the liveness timeout) is not mistaken for a dead
  client: the SDK's heartbeats keep it in the round, and its gRPC keepalive pings are
  within what the daemon permits.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client_sdk import Backoff, FederatedClient
from client_sdk.training import EvalResult, FitResult
from protos.v1 import fleet_pb2 as pb
from server.control_client import ControlClient, status_name
from server.daemon import Daemon
from tests.conftest import start_daemon, tiny_weights, wait_until
from tests.integration.rawclient import RawClient, update_messages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

POPULATION, QUORUM, ROUNDS, TIMEOUT_S = 20, 10, 4, 20.0


class Vanished(Exception):
    """Raised by a trainer to make its client disappear mid-round (no upload, no heartbeat)."""


class Worker:
    """A small deterministic learner; may be slow, and may vanish in a given round."""

    def __init__(self, index: int, delay_s: float, vanish_in_round: int | None = None) -> None:
        g = torch.Generator().manual_seed(index)
        self.x, self.y = torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g)
        self.delay_s, self.vanish_in_round = delay_s, vanish_in_round
        self.rounds_started = 0
        self.vanished = threading.Event()

    def fit(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> FitResult:
        self.rounds_started += 1
        if self.rounds_started == self.vanish_in_round:
            time.sleep(self.delay_s / 2)  # mid-training
            self.vanished.set()
            raise Vanished("gone")
        time.sleep(self.delay_s)
        grad = self.x.T @ (self.x @ weights["w"] - self.y) / len(self.x)
        return FitResult({"w": weights["w"] - 0.1 * grad}, len(self.x), {})

    def evaluate(self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> EvalResult:
        return EvalResult(len(self.x), float(((self.x @ weights["w"] - self.y) ** 2).mean()), {})


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "data", liveness_timeout_s=1.0, heartbeat_interval_s=0.2, selection_grace_s=0.3)
    yield d
    d.stop(grace=0.5)


def _client(address: str, run_id: str, worker: Worker, index: int) -> FederatedClient:
    return FederatedClient(
        address,
        "dropout-test",
        worker,
        name=f"client-{index}",
        run_id=run_id,
        backoff=Backoff(initial=0.1, maximum=0.5, timeout=60),
    )


def test_dropouts_every_round_completes_by_its_deadline_with_the_quorum(daemon: Daemon) -> None:
    rng = random.Random(20261123)
    vanishing = set(rng.sample(range(POPULATION), k=POPULATION * 3 // 10))
    slow = set(rng.sample(sorted(set(range(POPULATION)) - vanishing), k=2))
    workers = {
        i: Worker(
            i,
            delay_s=1.5 if i in slow else rng.uniform(0.05, 0.3),
            # Its first or second task: a client may miss a round (it asked for work after the
            # round closed at its quorum) and still vanish before the run ends.
            vanish_in_round=rng.randint(1, 2) if i in vanishing else None,
        )
        for i in range(POPULATION)
    }
    # The whole population is online before the run exists, so round 1 can pick anyone.
    clients = {i: _client(daemon.address, "", w, i) for i, w in workers.items()}
    for client in clients.values():
        client.start()
    with ControlClient(daemon.address) as control:
        try:
            deadline = time.monotonic() + 30
            while daemon.engine.online_count() < POPULATION:
                assert time.monotonic() < deadline, f"only {daemon.engine.online_count()} clients came online"
                time.sleep(0.05)
            run = control.create_run(
                app="dropout-test",
                weights={"w": torch.zeros(4, 2)},
                num_rounds=ROUNDS,
                clients_per_round=QUORUM,
                min_clients=QUORUM,
                round_timeout_s=TIMEOUT_S,
                # Over-select every online client (ceil(10 × 2.0) = 20) and close at the quorum
                # of 10: a vanishing client is picked in every round while it is still there
                # (a random sample of 16 could pass it over, and the dropout would not happen).
                over_selection=1.0,
            )
            deadline = time.monotonic() + 180
            while status_name(control.get_run(run.run_id).run) == "running" and time.monotonic() < deadline:
                time.sleep(0.2)
            detail = control.get_run(run.run_id)
        finally:
            for client in clients.values():
                client.stop(timeout=10)

    assert status_name(detail.run) == "completed", detail.run.status_reason
    assert [r.round for r in detail.rounds] == list(range(1, ROUNDS + 1))
    for summary in detail.rounds:
        assert summary.num_clients >= QUORUM, f"round {summary.round} committed below the quorum"
        assert summary.duration_seconds < TIMEOUT_S, f"round {summary.round} ran past its deadline"
    # The dropouts really happened, mid-round, and ended those clients...
    assert all(workers[i].vanished.is_set() for i in vanishing)
    assert all(type(clients[i].error).__name__ == "TrainingError" for i in vanishing)
    # ...while clients slower than the quorum (the two slow ones among them) were told their
    # round had closed, and kept serving without an error.
    staying = set(range(POPULATION)) - vanishing
    assert sum(clients[i].stats.late_results for i in staying) >= 1
    assert all(clients[i].error is None for i in staying)


def test_training_longer_than_the_liveness_timeout_keeps_the_client_in_its_round(daemon: Daemon) -> None:
    from client_sdk.transport import KEEPALIVE_TIME_MS
    from server.daemon import MIN_CLIENT_PING_INTERVAL_MS

    # The SDK's keepalive pings must be ones the daemon accepts, or it would cut idle clients off.
    assert KEEPALIVE_TIME_MS >= MIN_CLIENT_PING_INTERVAL_MS

    workers = [Worker(i, delay_s=3.0) for i in range(2)]  # 3 s of training against a 1 s liveness timeout
    with ControlClient(daemon.address) as control:
        run = control.create_run(
            app="dropout-test",
            weights={"w": torch.zeros(4, 2)},
            num_rounds=1,
            clients_per_round=2,
            min_clients=2,
            round_timeout_s=30,
        )
        clients = [_client(daemon.address, run.run_id, w, i) for i, w in enumerate(workers)]
        for client in clients:
            client.start()
        for client in clients:
            stats = client.join(timeout=60)
            assert (stats.rounds_trained, stats.late_results) == (1, 0)
        detail = control.get_run(run.run_id)
    assert status_name(detail.run) == "completed"
    assert [(r.round, r.num_clients) for r in detail.rounds] == [(1, 2)]


def test_an_upload_still_streaming_when_its_round_commits_hears_round_closed(tmp_path: Path) -> None:
    """The commit deletes the round's spool directory under an upload that is still
    streaming: that client is late (FAILED_PRECONDITION, which the SDK takes in its stride),
    not a victim of an internal error."""
    d = start_daemon(tmp_path / "data")
    try:
        fast, slow = RawClient(d.address, name="fast"), RawClient(d.address, name="slow")
        with ControlClient(d.address) as control:
            # Both selected (ceil(1 × 2.0) = 2); the round closes at the first update.
            run = control.create_run(
                app="tiny", weights=tiny_weights(), num_rounds=2, clients_per_round=1, min_clients=1, over_selection=1.0
            )
        fast_task, slow_task = fast.wait_task(), slow.wait_task()
        messages = update_messages(slow_task, tiny_weights(1), 5)
        spool = d.engine.checkpoints.root / "updates" / run.run_id / f"round-{slow_task.round:05d}"
        go = threading.Event()

        def stalled() -> Iterator[Any]:
            yield from messages[:2]  # the header and a first chunk: the spool file is open
            go.wait(20)
            yield from messages[2:]

        outcome: list[tuple[grpc.StatusCode, str]] = []

        def upload() -> None:
            try:
                slow.upload_messages(stalled())
            except grpc.RpcError as exc:
                outcome.append((exc.code(), exc.details() or ""))

        thread = threading.Thread(target=upload)
        thread.start()
        wait_until(lambda: list(spool.glob(".*.part")), 10, "the slow upload to open its spool file")
        assert fast.upload(fast_task, tiny_weights(2), 5).accepted
        wait_until(lambda: not spool.exists(), 10, "the commit to delete the round's spool directory")
        go.set()
        thread.join(20)
        fast.close()
        slow.close()
    finally:
        d.stop(grace=0.5)
    assert len(outcome) == 1 and outcome[0][0] == grpc.StatusCode.FAILED_PRECONDITION, outcome
    assert "closed" in outcome[0][1]


def test_a_client_fetching_the_model_of_a_task_whose_run_ended_hears_round_closed(tmp_path: Path) -> None:
    """Not NOT_FOUND, which the SDK reports as a vanished run and stops on: the client was late."""
    d = start_daemon(tmp_path / "data")
    try:
        client = RawClient(d.address)
        with ControlClient(d.address) as control:
            run = control.create_run(
                app="tiny", weights=tiny_weights(), num_rounds=1, clients_per_round=1, min_clients=1
            )
            task = client.wait_task()
            control.cancel_run(run.run_id)
        with pytest.raises(grpc.RpcError) as late:
            list(client.stub.DownloadModel(pb.DownloadModelRequest(task_id=task.task_id), metadata=client.metadata))
        client.close()
    finally:
        d.stop(grace=0.5)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION, late.value
    assert "expired" in (late.value.details() or "")
