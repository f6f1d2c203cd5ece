"""One-time enrollment tokens: how a client without a certificate obtains one.

Handing every edge node a key and certificate made elsewhere means moving private keys
around. Instead the operator can issue a short-lived token (`leptonfl certs client NAME
--enrollment-token`); the client generates its own key, and trades the token and a
certificate signing request for a certificate at the daemon's enrollment port
(`leptonfl certs enroll`). The key never leaves the client.

A token is `lfe1.<claims>.<signature>`: base64url JSON claims (`sub` the client name,
`exp` the expiry in Unix seconds, `jti` a random id, `days` the validity of the
certificate it buys), signed with the CA key (ECDSA, SHA-384). The daemon verifies it with
the CA certificate, so it keeps no list of issued tokens; it records each `jti` it
redeems, so a token works once. Pure functions: no gRPC, no database.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.errors import InvalidArgument, Unauthenticated
from server.provisioning import DEFAULT_DAYS, check_new_client, load_ca

TOKEN_PREFIX = "lfe1"
DEFAULT_TOKEN_TTL_S = 3600.0
MAX_TOKEN_CHARS = 2048
MAX_CSR_BYTES = 16 << 10
_SIGNATURE = ec.ECDSA(hashes.SHA384())


@dataclass(frozen=True)
class EnrollmentClaim:
    """What a verified token entitles its bearer to: one certificate for `name`."""

    name: str
    token_id: str
    expires_at: float
    days: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def issue_token(
    directory: Path,
    name: str,
    ttl_s: float = DEFAULT_TOKEN_TTL_S,
    days: int = DEFAULT_DAYS,
    now: float | None = None,
) -> str:
    """A token, signed with the CA key of `directory`, that buys one certificate for `name`."""
    check_new_client(directory, name)
    if ttl_s <= 0 or days <= 0:
        raise ValueError("the token lifetime and the certificate's validity must be positive")
    _, ca_key = load_ca(directory)
    issued = time.time() if now is None else now
    claims = {"sub": name, "exp": int(issued + ttl_s), "jti": secrets.token_hex(16), "days": days}
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return f"{TOKEN_PREFIX}.{_b64(payload)}.{_b64(ca_key.sign(payload, _SIGNATURE))}"


def verify_token(token: str, ca_cert: x509.Certificate, now: float | None = None) -> EnrollmentClaim:
    """The claim of a token signed by `ca_cert`'s key and not expired; raises otherwise."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise InvalidArgument(f"not a Lepton FL enrollment token (expected {TOKEN_PREFIX}.<claims>.<signature>)")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
    except (ValueError, binascii.Error) as exc:
        raise InvalidArgument("enrollment token is not valid base64url") from exc
    public_key = ca_cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey), "Lepton FL CAs have EC keys"
    try:
        public_key.verify(signature, payload, _SIGNATURE)
    except InvalidSignature as exc:
        raise Unauthenticated("enrollment token was not issued by this deployment's CA (or was altered)") from exc
    claims = json.loads(payload)  # signed by our CA: well-formed JSON of the shape issue_token writes
    claim = EnrollmentClaim(str(claims["sub"]), str(claims["jti"]), float(claims["exp"]), int(claims["days"]))
    if (time.time() if now is None else now) > claim.expires_at:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claim.expires_at))
        raise Unauthenticated(f"enrollment token for {claim.name!r} expired at {expired}; ask for a new one")
    return claim


def requested_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public key of a well-formed, self-signed CSR; only EC (≥ 256 bits) or RSA (≥ 2048)."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidArgument(f"certificate signing request over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidArgument("csr_pem is not a PEM-encoded certificate signing request") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("the certificate signing request is not signed by the key it carries")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256:
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise InvalidArgument("the requested key must be EC (P-256 or larger) or RSA (2048 bits or more)")
