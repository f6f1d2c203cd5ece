"""Enrollment tokens as pure functions: claims, expiry boundary, tampering, names."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography import x509

from server.enrollment import issue_token, verify_token
from server.errors import InvalidArgument, Unauthenticated
from server.provisioning import ProvisioningError, init_ca, issue_client


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory, ["127.0.0.1"])
    issue_client(directory, "taken")
    return directory


def ca_cert(pki: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())


def test_a_token_carries_exactly_what_it_was_issued_for(pki):
    token = issue_token(pki, "alice", ttl_s=90, days=7, now=1_000_000)
    claim = verify_token(token, ca_cert(pki), now=1_000_000)
    assert (claim.name, claim.expires_at, claim.days, len(claim.token_id)) == ("alice", 1_000_090, 7, 32)
    assert verify_token(issue_token(pki, "alice"), ca_cert(pki)).token_id != claim.token_id, "ids are random"


def test_a_token_is_valid_up_to_its_expiry_second_and_not_after(pki):
    token = issue_token(pki, "alice", ttl_s=60, now=5_000)
    assert verify_token(token, ca_cert(pki), now=5_060).name == "alice"
    with pytest.raises(Unauthenticated, match="expired at 1970-01-01 01:24:20 UTC"):
        verify_token(token, ca_cert(pki), now=5_060.001)


def test_changing_any_claim_breaks_the_signature(pki):
    prefix, claims, signature = issue_token(pki, "alice", now=0, ttl_s=1e9).split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    for field, value in (("sub", "mallory"), ("days", 36500), ("exp", decoded["exp"] + 1)):
        altered = base64.urlsafe_b64encode(json.dumps({**decoded, field: value}).encode()).rstrip(b"=").decode()
        with pytest.raises(Unauthenticated, match="or was altered"):
            verify_token(f"{prefix}.{altered}.{signature}", ca_cert(pki), now=0)


@pytest.mark.parametrize("token", ["", "lfe1", "lfe2.a.b", "lfe1.a.b.c", "lfe1.é.b", "lfe1." + "A" * 3000 + ".b"])
def test_malformed_tokens_are_invalid_arguments(pki, token):
    with pytest.raises(InvalidArgument):
        verify_token(token, ca_cert(pki))


@pytest.mark.parametrize("name", ["", "../etc", ".hidden", "a/b", "x" * 65, "taken"])
def test_tokens_are_only_issued_for_valid_free_names(pki, name):
    with pytest.raises(ProvisioningError):
        issue_token(pki, name)


def test_token_and_certificate_lifetimes_must_be_positive(pki):
    with pytest.raises(ValueError, match="positive"):
        issue_token(pki, "alice", ttl_s=0)
