"""Enrollment tokens end to end: a real TLS daemon with its enrollment port on loopback,
real tokens signed by a real CA, the SDK's `enroll` and the `leptonfl certs` commands.

A token buys one certificate for the client it names; the key stays on the client. Covered:
the certificate works for a whole round (and not on the Control API); a token works once,
even after the certificate it bought is revoked; expired, foreign, altered and malformed
tokens and bad requests get precise status codes, are counted, and burn no token; two
concurrent redemptions of one token yield one certificate; the enrollment port serves
nothing else; the CLI flow issues, enrolls and revokes.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_sdk import EnrollmentRefused, FederatedClient, enroll
from protos import PROTOCOL_VERSION
from protos.channels import TLSFiles
from protos.v1 import enrollment_pb2, enrollment_pb2_grpc, fleet_pb2_grpc
from protos.v1 import fleet_pb2 as fleet
from server.control_client import ControlClient, ControlError, status_name
from server.daemon import Daemon
from server.enrollment import issue_token
from server.provisioning import init_ca, issue_client, revoke_client
from tests.conftest import ROOT, start_daemon, wait_until
from tests.integration.test_tls import (
    APP,
    FAST,
    LEPTONFL,
    client_tls,
    create_run,
    operator_tls,
    tiny_trainer,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_ca(directory, ["localhost", "127.0.0.1"])
    issue_client(directory, "bob")  # provisioned the classic way, to run beside an enrolled client
    return directory


@pytest.fixture
def daemon(tmp_path: Path, pki: Path) -> Iterator[Daemon]:
    d = start_daemon(
        tmp_path / "data", insecure=False, tls_dir=str(pki), enroll_address="127.0.0.1:0", enroll_rate=1000
    )
    yield d
    d.stop(grace=0.2)


def csr_pem(key: Any = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def raw_enroll(daemon: Daemon, pki: Path, token: str, csr: bytes | None = None, version: int = PROTOCOL_VERSION) -> Any:
    """One Enroll call with a hand-made request; returns the reply or (code, details)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    with grpc.secure_channel(daemon.enroll_address, credentials) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        request = enrollment_pb2.EnrollRequest(protocol_version=version, token=token, csr_pem=csr or csr_pem())
        try:
            return stub.Enroll(request, timeout=5)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def test_a_token_buys_a_certificate_for_a_whole_round_and_works_once(tmp_path, pki, daemon):
    token = issue_token(pki, "carol", ttl_s=600)
    edge = tmp_path / "edge"  # the client's own machine: it never sees ca.key or pki/
    enrolled = enroll(daemon.enroll_address, token, pki / "ca.pem", edge)

    assert enrolled.name == "carol"
    assert enrolled.tls.key is not None and enrolled.tls.cert is not None
    assert oct(os.stat(enrolled.tls.key).st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(enrolled.tls.cert.read_bytes())
    subject = {a.oid: a.value for a in cert.subject}
    assert (subject[NameOID.COMMON_NAME], subject[NameOID.ORGANIZATIONAL_UNIT_NAME]) == ("carol", "client")
    assert (edge / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    assert (pki / "clients" / "carol.pem").read_bytes() == enrolled.tls.cert.read_bytes()
    assert not (pki / "clients" / "carol.key").exists(), "the key never reaches the daemon"

    run = create_run(daemon.address, pki)
    clients = [
        FederatedClient(daemon.address, APP, tiny_trainer(1), tls=enrolled.tls, name="carol", backoff=FAST),
        FederatedClient(daemon.address, APP, tiny_trainer(2), tls=client_tls(pki, "bob"), name="bob", backoff=FAST),
    ]
    for client in clients:
        client.start()
    try:
        stats = [client.join(timeout=20) for client in clients]
    finally:
        for client in clients:
            client.stop(timeout=5)
    assert [c.client_id for c in clients] == ["c-carol", "c-bob"], "the enrolled certificate's CN is the identity"
    assert [s.rounds_trained for s in stats] == [1, 1]
    with ControlClient(daemon.address, timeout=5, tls=operator_tls(pki)) as control:
        assert status_name(control.get_run(run.run_id).run) == "completed"
    with ControlClient(daemon.address, timeout=5, tls=enrolled.tls) as as_carol:
        with pytest.raises(ControlError) as denied:
            as_carol.list_runs()
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED

    # Used once: again while carol holds a certificate, and again after it is revoked.
    with pytest.raises(EnrollmentRefused) as again:
        enroll(daemon.enroll_address, token, pki / "ca.pem", tmp_path / "thief")
    assert again.value.code == "ALREADY_EXISTS"
    revoke_client(pki, "carol")
    with pytest.raises(EnrollmentRefused) as replay:
        enroll(daemon.enroll_address, token, pki / "ca.pem", tmp_path / "thief")
    assert replay.value.code == "PERMISSION_DENIED" and "already been used" in str(replay.value)
    assert not (tmp_path / "thief").exists()
    # ...and the revoked certificate is refused on the Fleet API like any other.
    peer = fleet_pb2_grpc.FleetStub(grpc.secure_channel(daemon.address, enrolled.tls.credentials()))

    def refused() -> bool:
        try:
            peer.Join(fleet.JoinRequest(protocol_version=PROTOCOL_VERSION, app=APP), timeout=5)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    wait_until(refused, 2.5, "the daemon to refuse the revoked enrolled certificate")


def test_bad_tokens_and_requests_get_precise_codes_and_burn_no_token(tmp_path, pki, daemon):
    other = tmp_path / "other-ca"
    init_ca(other, ["127.0.0.1"])
    valid = issue_token(pki, "dave")
    signature = valid.split(".")[2]
    forged = issue_token(pki, "mallory").split(".")[1]  # mallory's claims under dave's signature
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases = [
        (issue_token(pki, "erin", ttl_s=60, now=0), None, PROTOCOL_VERSION, "UNAUTHENTICATED", "expired"),
        (issue_token(other, "dave"), None, PROTOCOL_VERSION, "UNAUTHENTICATED", "not issued by this deployment"),
        (f"lfe1.{forged}.{signature}", None, PROTOCOL_VERSION, "UNAUTHENTICATED", "altered"),
        ("hello", None, PROTOCOL_VERSION, "INVALID_ARGUMENT", "not a Lepton FL enrollment token"),
        ("lfe1.@@.!!", None, PROTOCOL_VERSION, "INVALID_ARGUMENT", "base64url"),
        ("x" * 5000, None, PROTOCOL_VERSION, "INVALID_ARGUMENT", "not a Lepton FL enrollment token"),
        (valid, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", PROTOCOL_VERSION, "INVALID_ARGUMENT", "PEM"),
        (valid, csr_pem(weak), PROTOCOL_VERSION, "INVALID_ARGUMENT", "RSA (2048 bits or more)"),
        (valid, b"x" * (20 << 10), PROTOCOL_VERSION, "INVALID_ARGUMENT", "bytes"),
        (valid, None, PROTOCOL_VERSION + 1, "FAILED_PRECONDITION", "protocol"),
    ]
    for i, (token, csr, version, code, words) in enumerate(cases):
        answer = raw_enroll(daemon, pki, token, csr, version)
        assert isinstance(answer, tuple), f"case {i} was accepted"
        assert (answer[0].name, words in answer[1]) == (code, True), f"case {i}: {answer}"
    # The valid token was refused only for its requests: it is still good.
    reply = raw_enroll(daemon, pki, valid)
    assert isinstance(reply, enrollment_pb2.EnrollResponse) and reply.client_name == "dave"
    counted = daemon.metrics.rpc_rejections.labels("Enroll", "INVALID_ARGUMENT")._value.get()
    assert counted == 6


PRECISE = {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "ALREADY_EXISTS", "FAILED_PRECONDITION"}


@st.composite
def _mutated(draw: st.DrawFn, valid: str) -> str:
    """A valid token with one character replaced, dropped or repeated."""
    i = draw(st.integers(0, len(valid) - 1))
    kind = draw(st.sampled_from(["replace", "drop", "repeat"]))
    if kind == "replace":
        return valid[:i] + draw(st.characters(codec="utf-8")) + valid[i + 1 :]
    return valid[:i] + valid[i + 1 :] if kind == "drop" else valid[: i + 1] + valid[i:]


def _same_token(token: str, valid: str) -> bool:
    """Equal, or a non-canonical base64 spelling of the same bytes (which is the same token)."""
    try:
        decoded = [
            base64.b64decode(p + "=" * (-len(p) % 4), altchars=b"-_", validate=True) for p in token.split(".")[1:]
        ]
    except ValueError:
        return False
    return token.split(".")[0] == "lfe1" and decoded == [
        base64.b64decode(p + "=" * (-len(p) % 4), altchars=b"-_") for p in valid.split(".")[1:]
    ]


def test_fuzzed_tokens_and_requests_get_precise_codes_and_spend_nothing(tmp_path, pki, daemon):
    valid = issue_token(pki, "fuzzed")
    good_csr = csr_pem()
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    channel = grpc.secure_channel(daemon.enroll_address, credentials)
    stub = enrollment_pb2_grpc.EnrollmentStub(channel)
    seen: set[str] = set()

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        token=st.one_of(st.text(max_size=300), _mutated(valid)),
        csr=st.one_of(st.binary(max_size=300), st.just(good_csr), st.binary(max_size=40).map(lambda b: good_csr + b)),
    )
    def one(token: str, csr: bytes) -> None:
        if _same_token(token, valid) and csr.startswith(good_csr):
            return  # the one request that would (rightly) succeed: kept for the end
        request = enrollment_pb2.EnrollRequest(protocol_version=PROTOCOL_VERSION, token=token, csr_pem=csr)
        with pytest.raises(grpc.RpcError) as info:
            stub.Enroll(request, timeout=5)
        assert info.value.code().name in PRECISE, (token, csr, info.value.details())
        seen.add(info.value.code().name)

    try:
        one()
        assert {"INVALID_ARGUMENT", "UNAUTHENTICATED"} <= seen
        # Nothing was spent or written; the daemon still enrolls with the untouched token.
        assert not (pki / "clients" / "fuzzed.pem").exists()
        reply = stub.Enroll(
            enrollment_pb2.EnrollRequest(protocol_version=PROTOCOL_VERSION, token=valid, csr_pem=good_csr)
        )
        assert reply.client_name == "fuzzed"
    finally:
        channel.close()


def test_enrollment_is_rate_limited_per_peer(tmp_path, pki):
    daemon = start_daemon(tmp_path / "data", insecure=False, tls_dir=str(pki), enroll_address="127.0.0.1:0")
    try:  # the default: bursts of 5 per peer address, refilled at 1 per second
        codes = [raw_enroll(daemon, pki, "hello")[0] for _ in range(7)]
    finally:
        daemon.stop(grace=0.2)
    assert codes[:5] == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[5:]


def test_two_concurrent_redemptions_of_one_token_yield_one_certificate(pki, daemon):
    token = issue_token(pki, "frank")
    answers: list[Any] = []
    barrier = threading.Barrier(2)

    def redeem() -> None:
        barrier.wait()
        answers.append(raw_enroll(daemon, pki, token))

    threads = [threading.Thread(target=redeem) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    granted = [a for a in answers if isinstance(a, enrollment_pb2.EnrollResponse)]
    refused = sorted(a[0].name for a in answers if isinstance(a, tuple))
    assert len(granted) == 1 and refused in (["ALREADY_EXISTS"], ["PERMISSION_DENIED"]), answers


def test_the_enrollment_port_serves_only_enrollment(pki, daemon):
    tls = TLSFiles(pki / "ca.pem")
    stub = fleet_pb2_grpc.FleetStub(grpc.secure_channel(daemon.enroll_address, tls.credentials()))
    with pytest.raises(grpc.RpcError) as info:
        stub.Join(fleet.JoinRequest(protocol_version=PROTOCOL_VERSION, app=APP), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_enrollment_needs_the_certificates_dir_with_the_ca_key(tmp_path, pki):
    with pytest.raises(ValueError, match="--enroll-address needs --tls-dir"):
        start_daemon(tmp_path / "data", enroll_address="127.0.0.1:0")
    (pki / "ca.key").rename(tmp_path / "offline-ca.key")
    with pytest.raises(ValueError, match="needs the CA key .*ca.key"):
        start_daemon(tmp_path / "data", insecure=False, tls_dir=str(pki), enroll_address="127.0.0.1:0")


def leptonfl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEPTONFL_")}
    return subprocess.run(
        [*LEPTONFL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env={**clean, **(env or {})}
    )


def test_certs_commands_issue_a_token_enroll_and_revoke(tmp_path, pki, daemon):
    issued = leptonfl("certs", "client", "grace", "--dir", str(pki), "--enrollment-token", "--token-ttl", "300")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert token.startswith("lfe1.") and "valid once" in issued.stderr
    assert not (pki / "clients" / "grace.key").exists()

    edge = tmp_path / "edge"
    args = ("certs", "enroll", "--server", daemon.enroll_address, "--ca", str(pki / "ca.pem"), "--out", str(edge))
    missing = leptonfl(*args)
    assert missing.returncode == 1 and "LEPTONFL_ENROLLMENT_TOKEN" in missing.stderr
    made = leptonfl(*args, env={"LEPTONFL_ENROLLMENT_TOKEN": token})
    assert made.returncode == 0, made.stderr
    assert f"--certs {edge} --name grace" in made.stderr
    assert oct(os.stat(edge / "clients" / "grace.key").st_mode & 0o777) == "0o600"
    used = leptonfl(*args, env={"LEPTONFL_ENROLLMENT_TOKEN": token})
    assert used.returncode == 1 and "ALREADY_EXISTS" in used.stderr, used.stderr

    revoked = leptonfl("certs", "revoke", "grace", "--dir", str(pki))
    assert revoked.returncode == 0, revoked.stderr
    assert list((pki / "clients").glob("grace.pem.revoked-*")), "the enrolled certificate is set aside"
    taken = leptonfl("certs", "client", "bob", "--dir", str(pki), "--enrollment-token")
    assert taken.returncode == 1 and "already has a certificate" in taken.stderr
