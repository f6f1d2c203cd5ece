"""Mutual TLS end to end: real certificates, a real daemon, real gRPC over loopback.

Every test provisions its own deployment with `server.provisioning` (a CA, a server
certificate for localhost and 127.0.0.1, an operator credential, client certificates) and
talks to the daemon at 127.0.0.1:PORT, so the server certificate's IP SAN is what the
clients verify. Covered: a whole run over mTLS; every way a peer is refused (no
certificate, another CA, expired, revoked, plaintext, impostor server); roles (client vs
operator); per-assignment authorization of uploads; the plaintext opt-in; rate limits; and
the `leptonfl certs` / `leptonfl run --certs` commands in separate processes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from torch.utils.data import DataLoader, TensorDataset

from client_sdk import (
    AuthenticationError,
    Backoff,
    ConnectionFailed,
    FederatedClient,
    LeptonError,
    TorchTrainer,
)
from client_sdk.transport import FleetTransport
from leptonfl.cli import main
from protos import PROTOCOL_VERSION
from protos.channels import TLSFiles, open_channel
from protos.v1 import control_pb2, fleet_pb2_grpc
from protos.v1 import fleet_pb2 as pb
from server.config import ServerConfig
from server.control_client import ControlClient, ControlError, status_name
from server.daemon import Daemon
from server.provisioning import init_ca, issue_client, revoke, revoked_serials
from tests.conftest import ROOT, start_daemon, wait_until
from tests.integration.rawclient import update_messages

pytestmark = pytest.mark.timeout(60)

APP = "tiny"
FAST = Backoff(initial=0.1, maximum=0.5)
LEPTONFL = [sys.executable, "-m", "leptonfl"]
LISTENING = re.compile(r"listening on (\S+)")


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


def client_tls(pki: Path, name: str) -> TLSFiles:
    return TLSFiles.from_dir(pki, f"clients/{name}")


def operator_tls(pki: Path) -> TLSFiles:
    return TLSFiles.from_dir(pki, "operator")


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def create_run(address: str, pki: Path, **overrides: Any) -> control_pb2.Run:
    settings: dict[str, Any] = {
        "app": APP,
        "weights": initial_weights(),
        "num_rounds": 1,
        "clients_per_round": 2,
        "min_clients": 2,
        "round_timeout_s": 20,
        "client_config": {"lr": 0.1},
        **overrides,
    }
    with ControlClient(address, timeout=5, tls=operator_tls(pki)) as control:
        return control.create_run(**settings)


class Peer:
    """A bare Fleet client over whatever channel it is given (TLS or plaintext)."""

    def __init__(self, address: str, tls: TLSFiles | None) -> None:
        self.channel = open_channel(address, tls)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        self.client_id = self.token = ""

    def join(self, **fields: Any) -> pb.JoinResponse:
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, app=APP, **fields)
        response = self.stub.Join(request, timeout=5)
        self.client_id, self.token = response.client_id, response.token
        return response

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-leptonfl-client-id", self.client_id), ("x-leptonfl-token", self.token))

    def wait_task(self, timeout: float = 10.0) -> pb.Task:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.stub.GetTask(pb.GetTaskRequest(), metadata=self.metadata, timeout=5)
            if answer.HasField("task"):
                return answer.task
            time.sleep(0.05)
        raise TimeoutError("no task")

    def upload(
        self, messages: list[pb.UploadChunk], metadata: tuple[tuple[str, str], ...] | None = None
    ) -> pb.UploadResponse:
        return self.stub.UploadUpdate(iter(messages), metadata=metadata or self.metadata, timeout=5)

    def close(self) -> None:
        self.channel.close()


# fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A deployment's certificates dir: CA, server (localhost, 127.0.0.1), operator, alice, bob."""
    directory = tmp_path / "pki"
    init_ca(directory, ["localhost", "127.0.0.1"])
    for name in ("alice", "bob"):
        issue_client(directory, name)
    return directory


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Factory of in-process TLS daemons on 127.0.0.1:0; all are stopped at teardown."""
    started: list[Daemon] = []

    def make(data_dir: Path, pki: Path | None, **overrides: Any) -> Daemon:
        settings: dict[str, Any] = {"insecure": False, "tls_dir": str(pki)} if pki else {}
        daemon = start_daemon(data_dir, **{**settings, **overrides})
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop(grace=0.2)


@pytest.fixture
def tls_daemon(tmp_path: Path, pki: Path, daemons: Callable[..., Daemon]) -> Daemon:
    daemon = daemons(tmp_path / "data", pki)
    assert daemon.address.startswith("127.0.0.1:")
    return daemon


@pytest.fixture
def peers() -> Iterator[Callable[[str, TLSFiles | None], Peer]]:
    made: list[Peer] = []

    def make(address: str, tls: TLSFiles | None) -> Peer:
        peer = Peer(address, tls)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def sdk_clients() -> Iterator[Callable[..., FederatedClient]]:
    made: list[FederatedClient] = []

    def make(address: str, tls: TLSFiles | None, **kwargs: Any) -> FederatedClient:
        kwargs.setdefault("backoff", FAST)
        trainer = kwargs.pop("trainer", None) or tiny_trainer()
        client = FederatedClient(address, APP, trainer, tls=tls, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop(timeout=5)


# 1. a whole run over mutual TLS -----------------------------------------------------------
def test_a_whole_run_over_mutual_tls_with_certificate_identities(pki, tls_daemon, sdk_clients):
    address = tls_daemon.address
    run = create_run(address, pki, num_rounds=2)
    clients = [
        sdk_clients(address, client_tls(pki, name), name=name, trainer=tiny_trainer(seed))
        for seed, name in enumerate(("alice", "bob"), start=1)
    ]
    for client in clients:
        client.start()
    stats = [client.join(timeout=12) for client in clients]

    assert [c.client_id for c in clients] == ["c-alice", "c-bob"], "the certificate's CN fixes the client id"
    assert [(s.rounds_trained, s.rounds_evaluated) for s in stats] == [(2, 2), (2, 2)]
    with ControlClient(address, timeout=5, tls=operator_tls(pki)) as control:
        detail = control.get_run(run.run_id)
        final = control.download(run.run_id)
    assert status_name(detail.run) == "completed"
    assert [(r.round, r.num_clients, r.eval_clients) for r in detail.rounds] == [(1, 2, 2), (2, 2, 2)]
    assert not torch.equal(final["weight"], initial_weights()["weight"])
    record = tls_daemon.store.get_client("c-alice")
    assert record is not None and record.name == "alice"


def test_the_body_of_a_join_cannot_choose_another_client_id(pki, tls_daemon, peers):
    alice = peers(tls_daemon.address, client_tls(pki, "alice"))
    alice.join()
    bob = peers(tls_daemon.address, client_tls(pki, "bob"))
    # Bob asks to resume as alice, even with alice's real token: the certificate decides.
    joined = bob.join(client_id=alice.client_id, token=alice.token, name="alice")
    assert joined.client_id == "c-bob"
    # ...and alice's session is untouched (a Join as c-alice would have replaced her token).
    assert alice.stub.Heartbeat(pb.HeartbeatRequest(), metadata=alice.metadata, timeout=5) is not None


# 2. refused peers -------------------------------------------------------------------------
def test_a_client_without_a_certificate_fails_the_handshake(pki, tls_daemon, peers, sdk_clients):
    anonymous = TLSFiles(pki / "ca.pem")  # trusts the server, but shows no certificate
    code, _ = rpc_error(lambda: peers(tls_daemon.address, anonymous).join())
    assert code == grpc.StatusCode.UNAVAILABLE

    client = sdk_clients(tls_daemon.address, anonymous, backoff=Backoff(initial=0.05, maximum=0.1, timeout=0.5))
    started = time.monotonic()
    client.start()
    with pytest.raises(ConnectionFailed) as info:
        client.join(timeout=10)
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 5


def test_a_certificate_from_another_ca_is_refused(tmp_path, pki, tls_daemon, peers):
    other = tmp_path / "other-ca"
    init_ca(other, ["localhost", "127.0.0.1"])
    issue_client(other, "alice")  # the same name as a real client, signed by the wrong CA
    forged = TLSFiles(pki / "ca.pem", other / "clients" / "alice.pem", other / "clients" / "alice.key")
    code, _ = rpc_error(lambda: peers(tls_daemon.address, forged).join())
    assert code == grpc.StatusCode.UNAVAILABLE
    forged_operator = TLSFiles(pki / "ca.pem", other / "operator.pem", other / "operator.key")
    with ControlClient(tls_daemon.address, timeout=5, tls=forged_operator) as control:
        with pytest.raises(ControlError) as info:
            control.list_runs()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_expired_certificate_is_refused(pki, tls_daemon, peers):
    issue_client(pki, "old", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
    code, _ = rpc_error(lambda: peers(tls_daemon.address, client_tls(pki, "old")).join())
    assert code == grpc.StatusCode.UNAVAILABLE
    issue_client(pki, "early", days=10, not_before=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    code, _ = rpc_error(lambda: peers(tls_daemon.address, client_tls(pki, "early")).join())
    assert code == grpc.StatusCode.UNAVAILABLE, "a certificate that is not valid yet must be refused too"


def test_a_plaintext_client_is_refused_by_a_tls_daemon(tls_daemon, peers):
    code, _ = rpc_error(lambda: peers(tls_daemon.address, None).join())
    assert code == grpc.StatusCode.UNAVAILABLE
    with ControlClient(tls_daemon.address, timeout=5) as control:
        with pytest.raises(ControlError) as info:
            control.list_runs()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_clients_refuse_a_server_they_cannot_verify(tmp_path, pki, daemons, peers):
    # An impostor daemon with its own CA: a client that trusts only the real CA must not talk to it.
    impostor_pki = tmp_path / "impostor"
    init_ca(impostor_pki, ["localhost", "127.0.0.1"])
    impostor = daemons(tmp_path / "impostor-data", impostor_pki)
    code, details = rpc_error(lambda: peers(impostor.address, client_tls(pki, "alice")).join())
    assert code == grpc.StatusCode.UNAVAILABLE, details
    # The real CA, but a server certificate for other names than the address dialled.
    misnamed_pki = tmp_path / "misnamed"
    init_ca(misnamed_pki, ["fl.example.invalid"])
    issue_client(misnamed_pki, "alice")
    misnamed = daemons(tmp_path / "misnamed-data", misnamed_pki)
    code, details = rpc_error(lambda: peers(misnamed.address, client_tls(misnamed_pki, "alice")).join())
    assert code == grpc.StatusCode.UNAVAILABLE, details


def test_a_revoked_certificate_is_refused_within_two_seconds(pki, tls_daemon, peers, sdk_clients):
    alice = peers(tls_daemon.address, client_tls(pki, "alice"))
    assert alice.join().client_id == "c-alice"

    serial = revoke(pki, pki / "clients" / "alice.pem")
    assert serial in revoked_serials(pki)
    started = time.monotonic()
    outcome: tuple[grpc.StatusCode, str] | None = None
    while time.monotonic() - started < 2.5:
        try:
            alice.join()
        except grpc.RpcError as exc:
            outcome = (exc.code(), exc.details() or "")
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert outcome is not None, "the revoked certificate still joins after 2.5 s"
    assert outcome[0] == grpc.StatusCode.UNAUTHENTICATED and "revoked" in outcome[1], outcome
    assert elapsed <= 2.0, f"revocation took {elapsed:.2f} s to apply"

    # The session alice opened before the revocation is cut off too, on every RPC.
    code, details = rpc_error(lambda: alice.stub.GetTask(pb.GetTaskRequest(), metadata=alice.metadata, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    # The SDK reports it as an authentication error at once, without retrying forever.
    client = sdk_clients(tls_daemon.address, client_tls(pki, "alice"), backoff=Backoff(0.05, 0.1, timeout=5))
    client.start()
    with pytest.raises(AuthenticationError):
        client.join(timeout=5)
    # Other clients are unaffected.
    assert peers(tls_daemon.address, client_tls(pki, "bob")).join().client_id == "c-bob"


def test_the_daemon_runs_without_the_ca_key_and_reloads_a_copied_crl(tmp_path, pki, daemons, peers):
    """The documented layout: the CA key stays offline; the server host gets four files."""
    server_dir = tmp_path / "server-tls"
    server_dir.mkdir()
    for name in ("server.pem", "server.key", "ca.pem", "crl.pem"):
        (server_dir / name).write_bytes((pki / name).read_bytes())
    daemon = daemons(tmp_path / "data", server_dir)
    alice = peers(daemon.address, client_tls(pki, "alice"))
    assert alice.join().client_id == "c-alice"

    revoke(pki, pki / "clients" / "alice.pem")  # on the CA's machine
    (server_dir / "crl.pem.new").write_bytes((pki / "crl.pem").read_bytes())
    os.replace(server_dir / "crl.pem.new", server_dir / "crl.pem")  # copied over atomically
    wait_until(lambda: _refused(alice), 2.5, "the daemon to reload the copied crl.pem")
    assert peers(daemon.address, client_tls(pki, "bob")).join().client_id == "c-bob"


# 3. roles -------------------------------------------------------------------------------
def test_a_client_certificate_cannot_call_the_control_api(pki, tls_daemon):
    run = create_run(tls_daemon.address, pki)
    issue_client(pki, "operator")  # a *client* named "operator": the role is the OU, not the name
    for name in ("alice", "operator"):
        with ControlClient(tls_daemon.address, timeout=5, tls=client_tls(pki, name)) as control:
            calls: dict[str, Callable[[], object]] = {
                "ListRuns": control.list_runs,
                "GetRun": lambda c=control: c.get_run(run.run_id),
                "CreateRun": lambda c=control: c.create_run(
                    app=APP, weights=initial_weights(), num_rounds=1, clients_per_round=1, min_clients=1
                ),
                "CancelRun": lambda c=control: c.cancel_run(run.run_id, "hijack"),
                "WatchRun": lambda c=control: next(iter(c.watch(run.run_id))),
                "DownloadCheckpoint": lambda c=control: c.download(run.run_id),
            }
            for rpc, call in calls.items():
                with pytest.raises(ControlError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.PERMISSION_DENIED, f"{name} {rpc}: {info.value}"
                assert "operator only" in str(info.value)
    with ControlClient(tls_daemon.address, timeout=5, tls=operator_tls(pki)) as control:
        runs = control.list_runs()
        assert [(r.run_id, status_name(r)) for r in runs] == [(run.run_id, "running")], "nothing was changed"


def test_an_operator_certificate_cannot_call_the_fleet_api(pki, tls_daemon, peers):
    create_run(tls_daemon.address, pki)
    operator = peers(tls_daemon.address, operator_tls(pki))
    code, details = rpc_error(operator.join)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "client only" in details, details
    # Nor with a session borrowed from a real client.
    alice = peers(tls_daemon.address, client_tls(pki, "alice"))
    alice.join()
    operator.client_id, operator.token = alice.client_id, alice.token
    for call in (
        lambda: operator.stub.Heartbeat(pb.HeartbeatRequest(), metadata=operator.metadata, timeout=5),
        lambda: operator.stub.GetTask(pb.GetTaskRequest(), metadata=operator.metadata, timeout=5),
    ):
        assert rpc_error(call)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert tls_daemon.store.get_client("c-operator") is None


# 4. authorization of uploads --------------------------------------------------------------
def test_a_client_can_upload_only_for_its_own_assignment_and_only_once(pki, tls_daemon, peers):
    address = tls_daemon.address
    run = create_run(address, pki)
    alice, bob = peers(address, client_tls(pki, "alice")), peers(address, client_tls(pki, "bob"))
    alice.join()
    bob.join()
    alice_task, bob_task = alice.wait_task(), bob.wait_task()
    alice_w = {"weight": torch.full((3, 2), 1.0), "bias": torch.full((3,), 2.0)}
    bob_w = {"weight": torch.full((3, 2), 4.0), "bias": torch.full((3,), -1.0)}
    alice_messages = update_messages(alice_task, alice_w, 1)
    evil = {"weight": torch.full((3, 2), 1e6), "bias": torch.full((3,), 1e6)}

    # Bob cannot act as alice: neither with alice's client id alone, nor with her stolen token.
    for metadata in (
        (("x-leptonfl-client-id", alice.client_id), ("x-leptonfl-token", bob.token)),
        alice.metadata,
    ):
        code, details = rpc_error(lambda m=metadata: bob.upload(update_messages(alice_task, evil, 1), m))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot act as client" in details, details
        code, _ = rpc_error(lambda m=metadata: bob.stub.GetTask(pb.GetTaskRequest(), metadata=m, timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    # Bob cannot upload into alice's assignment under his own identity, nor fetch her task's model.
    code, details = rpc_error(lambda: bob.upload(update_messages(alice_task, evil, 1)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not assigned" in details, details
    code, _ = rpc_error(
        lambda: list(bob.stub.DownloadModel(pb.DownloadModelRequest(task_id=alice_task.task_id), metadata=bob.metadata))
    )
    assert code == grpc.StatusCode.NOT_FOUND

    assert alice.upload(alice_messages).accepted
    # Bob replays alice's accepted upload byte for byte, as himself and as her: refused.
    code, _ = rpc_error(lambda: bob.upload(alice_messages))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = rpc_error(lambda: bob.upload(alice_messages, alice.metadata))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Alice's own duplicate (a retry of a delivered upload) is recognised as such.
    code, details = rpc_error(lambda: alice.upload(alice_messages))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already accepted" in details, details

    assert bob.upload(update_messages(bob_task, bob_w, 3)).accepted
    for peer in (alice, bob):
        task = peer.wait_task()
        assert task.type == pb.EVALUATE
        peer.stub.ReportEvaluation(
            pb.EvaluationReport(task_id=task.task_id, run_id=run.run_id, round=1, num_examples=4, loss=0.5),
            metadata=peer.metadata,
            timeout=5,
        )
    with ControlClient(address, timeout=5, tls=operator_tls(pki)) as control:
        wait_until(lambda: status_name(control.get_run(run.run_id).run) == "completed", 10, "the run to complete")
        final = control.download(run.run_id)
    # Exactly the FedAvg of alice (1 example) and bob (3 examples): none of the refused uploads leaked in.
    assert torch.allclose(final["weight"], torch.full((3, 2), 3.25))
    assert torch.allclose(final["bias"], torch.full((3,), -0.25))


# 5. plaintext is an explicit choice -------------------------------------------------------
def test_the_daemon_refuses_to_start_without_tls_unless_insecure(tmp_path, caplog, daemons, peers, pki):
    with pytest.raises(ValueError, match="--insecure"):
        Daemon(ServerConfig(address="127.0.0.1:0", data_dir=tmp_path / "refused"))

    with caplog.at_level(logging.WARNING, logger="leptonfl.daemon"):
        plain = daemons(tmp_path / "plain", None, insecure=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("PLAINTEXT" in message for message in warnings), warnings
    assert peers(plain.address, None).join().client_id.startswith("c-")

    # TLS material wins over --insecure: no plaintext listener, no warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leptonfl.daemon"):
        both = daemons(tmp_path / "both", pki, insecure=True)
    assert not any("PLAINTEXT" in r.getMessage() for r in caplog.records)
    assert rpc_error(lambda: peers(both.address, None).join())[0] == grpc.StatusCode.UNAVAILABLE
    assert peers(both.address, client_tls(pki, "alice")).join().client_id == "c-alice"


# 6. rate limits ---------------------------------------------------------------------------
def test_joins_are_rate_limited_per_identity_and_the_sdk_waits_and_retries(
    tmp_path, pki, daemons, peers, sdk_clients, caplog, monkeypatch
):
    daemon = daemons(tmp_path / "data", pki, join_rate=1.0)
    alice = peers(daemon.address, client_tls(pki, "alice"))
    # The limiter's clock stands still during the burst, so a slow disk (each mTLS Join
    # commits a row) cannot refill a token between the joins and blur the count.
    frozen = time.monotonic()
    monkeypatch.setattr("server.auth.time", types.SimpleNamespace(monotonic=lambda: frozen))
    outcomes: list[grpc.StatusCode | None] = []
    for _ in range(12):
        try:
            alice.join()
            outcomes.append(None)
        except grpc.RpcError as exc:
            outcomes.append(exc.code())
    assert outcomes[:10] == [None] * 10, outcomes
    assert outcomes[10:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, outcomes
    code, details = rpc_error(alice.join)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slow down" in details
    # The bucket is per certificate identity: bob is not throttled by alice's flood.
    assert peers(daemon.address, client_tls(pki, "bob")).join().client_id == "c-bob"
    monkeypatch.undo()  # the clock runs again: alice's bucket refills at 1 per second

    # A throttled SDK client backs off and joins once a token is back (1 per second).
    with caplog.at_level(logging.WARNING, logger="leptonfl.client"):
        client = sdk_clients(daemon.address, client_tls(pki, "alice"), exit_when_idle=False)
        started = time.monotonic()
        client.start()
        wait_until(lambda: client.client_id, 5, "the throttled client to join")
    assert client.client_id == "c-alice" and client.error is None
    assert time.monotonic() - started < 4
    assert any("RESOURCE_EXHAUSTED" in r.getMessage() for r in caplog.records), "the SDK never saw the limit"


def test_uploads_are_rate_limited_per_client(tmp_path, pki, daemons, peers):
    daemon = daemons(tmp_path / "data", pki, upload_rate=0.2)
    create_run(daemon.address, pki)
    alice, bob = peers(daemon.address, client_tls(pki, "alice")), peers(daemon.address, client_tls(pki, "bob"))
    alice.join()
    bob.join()
    alice_task, bob_task = alice.wait_task(), bob.wait_task()
    messages = update_messages(alice_task, initial_weights(), 1)
    codes: list[grpc.StatusCode | None] = []
    for _ in range(11):
        try:
            alice.upload(messages)
            codes.append(None)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert codes == [None] + [grpc.StatusCode.ALREADY_EXISTS] * 9 + [grpc.StatusCode.RESOURCE_EXHAUSTED], codes
    assert bob.upload(update_messages(bob_task, initial_weights(), 1)).accepted, "bob has his own bucket"


def test_the_sdk_does_not_mistake_an_oversized_message_for_a_rate_limit(pki, tls_daemon):
    """gRPC answers RESOURCE_EXHAUSTED for a message over the daemon's 16 MiB limit too.

    That is not "slow down": retrying the same message can never succeed. The SDK must either
    keep its chunks under the limit (and succeed) or fail at once with a clear error — not
    retry until its backoff timeout and then claim the server is unreachable.
    """
    weights = {"w": torch.zeros(17 << 18)}  # 17 MiB of float32 in one tensor
    run = create_run(tls_daemon.address, pki, weights=weights, clients_per_round=1, min_clients=1)
    with pytest.raises(ValueError, match="chunk_bytes"):  # chunks above the daemon's limit fail at once
        FleetTransport(tls_daemon.address, APP, chunk_bytes=32 << 20, tls=client_tls(pki, "alice"))
    transport = FleetTransport(
        tls_daemon.address,
        APP,
        backoff=Backoff(initial=0.05, maximum=0.1, timeout=3.0),
        chunk_bytes=8 << 20,  # the largest allowed: a 17 MiB tensor goes up in three chunks
        tls=client_tls(pki, "alice"),
    )
    try:
        transport.join()
        answers: list[pb.GetTaskResponse] = []
        wait_until(lambda: answers.append(transport.get_task()) or answers[-1].HasField("task"), 10, "a task")
        task = answers[-1].task
        assert task.run_id == run.run_id
        started = time.monotonic()
        try:
            transport.upload(task, weights, 1, {})
            error: LeptonError | None = None
        except LeptonError as exc:
            error = exc
        elapsed = time.monotonic() - started
    finally:
        transport.close()
    assert not isinstance(error, ConnectionFailed), (
        f"after {elapsed:.1f} s of retries: {error} — an oversized message is not a rate limit or an outage"
    )
    assert elapsed < 2.0, f"the upload took {elapsed:.1f} s"


def test_a_client_hanging_up_mid_upload_leaves_no_error_in_the_daemon_log(pki, tls_daemon, peers, caplog):
    """A vanished client is routine (the servicer logs it at INFO as "abandoned"), not an ERROR."""
    create_run(tls_daemon.address, pki, clients_per_round=1, min_clients=1)
    alice = peers(tls_daemon.address, client_tls(pki, "alice"))
    alice.join()
    task = alice.wait_task()
    messages = update_messages(task, initial_weights(), 1)
    release = threading.Event()

    def stalled() -> Iterator[pb.UploadChunk]:
        yield messages[0]
        yield messages[1]
        release.wait(10)

    with caplog.at_level(logging.INFO):
        future = alice.stub.UploadUpdate.future(stalled(), metadata=alice.metadata, timeout=10)
        wait_until(lambda: future.running() or future.done(), 5, "the upload to start")
        time.sleep(0.3)
        future.cancel()
        release.set()
        # Depending on timing gRPC shows the hang-up as a cancelled call or as a stream that ended
        # early; either way the partial update is discarded and logged at INFO.
        noticed = ("abandoned", "stream ended early")
        wait_until(
            lambda: any(n in r.getMessage() for r in caplog.records for n in noticed), 20, "the daemon to notice"
        )
        time.sleep(0.2)
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert alice.upload(update_messages(task, initial_weights(), 1)).accepted, "the retry is accepted"
    assert errors == [], f"the daemon logged errors for a client that hung up: {errors}"


# 7. provisioning and rotation through the CLI ---------------------------------------------
def leptonfl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTONFL_")}
    return subprocess.run([*LEPTONFL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def serial_of(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_certs_commands_issue_rotate_and_revoke(tmp_path, daemons, peers):
    d = tmp_path / "certs"
    made = leptonfl("certs", "init", str(d), "--host", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    assert f"--tls-dir {d}" in made.stderr
    again = leptonfl("certs", "init", str(d), "--host", "127.0.0.1")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr, again.stderr

    first = leptonfl("certs", "client", "alice", "--dir", str(d))
    assert first.returncode == 0, first.stderr
    old_serial = serial_of(d / "clients" / "alice.pem")
    duplicate = leptonfl("certs", "client", "alice", "--dir", str(d))
    assert duplicate.returncode == 1 and "already has a certificate" in duplicate.stderr, duplicate.stderr

    rotated = leptonfl("certs", "client", "alice", "--dir", str(d), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_serial = serial_of(d / "clients" / "alice.pem")
    assert new_serial != old_serial
    assert revoked_serials(d) == [old_serial], "rotation revokes the previous certificate in crl.pem"
    old = TLSFiles(
        d / "ca.pem",
        d / "clients" / f"alice.pem.revoked-{old_serial:x}",
        d / "clients" / f"alice.key.revoked-{old_serial:x}",
    )
    assert old.cert is not None and old.cert.exists() and old.key is not None and old.key.exists()

    for key in (
        "ca.key",
        "server.key",
        "operator.key",
        "clients/alice.key",
        f"clients/alice.key.revoked-{old_serial:x}",
    ):
        assert mode_of(d / key) == 0o600, f"{key} is {oct(mode_of(d / key))}"

    daemon = daemons(tmp_path / "data", d)
    assert peers(daemon.address, client_tls(d, "alice")).join().client_id == "c-alice", "the new certificate works"
    code, details = rpc_error(lambda: peers(daemon.address, old).join())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details

    revoked = leptonfl("certs", "revoke", "alice", "--dir", str(d))
    assert revoked.returncode == 0, revoked.stderr
    assert sorted(revoked_serials(d)) == sorted([old_serial, new_serial])
    # `certs revoke` moves the files aside (so the name can be issued again); the holder still has them.
    held = TLSFiles(
        d / "ca.pem",
        d / "clients" / f"alice.pem.revoked-{new_serial:x}",
        d / "clients" / f"alice.key.revoked-{new_serial:x}",
    )
    current = peers(daemon.address, held)
    wait_until(lambda: _refused(current), 2.5, "the running daemon to reload crl.pem after `leptonfl certs revoke`")


def test_a_revoked_client_can_get_a_new_certificate(tmp_path):
    d = tmp_path / "certs"
    assert leptonfl("certs", "init", str(d)).returncode == 0
    assert leptonfl("certs", "client", "alice", "--dir", str(d)).returncode == 0
    first = serial_of(d / "clients" / "alice.pem")
    assert leptonfl("certs", "revoke", "alice", "--dir", str(d)).returncode == 0
    # --rotate after a revocation: the revoked files are moved aside and a new certificate issued.
    rotated = leptonfl("certs", "client", "alice", "--dir", str(d), "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    second = serial_of(d / "clients" / "alice.pem")
    assert second != first and revoked_serials(d) == [first]

    assert leptonfl("certs", "revoke", "alice", "--dir", str(d)).returncode == 0
    # "already has a certificate; revoke it before issuing another" — so after revoking, issuing
    # must work, or the refusal must point to the command that does (--rotate).
    again = leptonfl("certs", "client", "alice", "--dir", str(d))
    assert again.returncode == 0 or "--rotate" in again.stderr, (
        f"after `certs revoke alice`, `certs client alice` says: {again.stderr.strip()}"
    )


def _refused(peer: Peer) -> bool:
    try:
        peer.join()
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        return True
    return False


# 8. `leptonfl run` against a TLS daemon in its own process --------------------------------
# `leptonfl run ...` spends seconds importing torch and opacus before it parses a flag. So the
# CLI process starts together with the daemon, does those imports, waits for its address, and
# then runs the very entry point of `python -m leptonfl` / the `leptonfl` script with that argv.
# The refused variant runs the same `main(argv)` in this process (the imports are paid here).
PREWARMED_CLI = """
import sys, time
from pathlib import Path
import leptonfl.commands, server.control_client  # the slow imports, while the daemon starts
from leptonfl.cli import main
go, deadline = Path(sys.argv[1]), time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        raise SystemExit("the test never said go")
    time.sleep(0.02)
address = go.read_text()
raise SystemExit(main([address if arg == "{address}" else arg for arg in sys.argv[2:]]))
"""


def test_run_list_over_tls_against_a_daemon_process(tmp_path, pki, capsys, monkeypatch):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LEPTONFL_")}, "PYTHONUNBUFFERED": "1"}
    log_path, go = tmp_path / "daemon.log", tmp_path / "go"
    spawned: list[subprocess.Popen[str]] = []

    def cli(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", PREWARMED_CLI, str(go), "run", "list", "--server", "{address}", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        spawned.append(process)
        return process

    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [*LEPTONFL, "server", "start", "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
            + ["--tls-dir", str(pki)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    try:
        with_certs = cli("--certs", str(pki), "--json")
        address = ""
        deadline = time.monotonic() + 45
        while not address and time.monotonic() < deadline:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            if match:
                address = match.group(1)
            elif daemon.poll() is not None:
                break
            else:
                time.sleep(0.05)
        assert address, f"the daemon did not start:\n{log_path.read_text(errors='replace')}"
        log_text = log_path.read_text()
        assert "mutual TLS" in log_text and "PLAINTEXT" not in log_text, log_text
        run = create_run(address, pki)
        (tmp_path / "go.tmp").write_text(address)
        os.replace(tmp_path / "go.tmp", go)

        out, err = with_certs.communicate(timeout=45)
        assert with_certs.returncode == 0, err
        listed = json.loads(out)
        assert [(r["run_id"], r["status"]) for r in listed] == [(run.run_id, "running")]
        for key in [k for k in os.environ if k.startswith("LEPTONFL_")]:
            monkeypatch.delenv(key)
        capsys.readouterr()
        assert main(["run", "list", "--server", address, "--json"]) == 1, "plaintext against TLS must fail"
        out, err = capsys.readouterr()
        assert out == "" and "without TLS" in err and "error: list runs" in err, (out, err)
    finally:
        for process in spawned:
            if process.poll() is None:
                process.kill()
                process.wait()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(15)
    assert code == 0, log_path.read_text(errors="replace")
