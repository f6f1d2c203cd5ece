"""Who is calling: peer identity from the mTLS certificate, revocation, roles, rate limits.

With TLS, every peer presents a certificate signed by the deployment's CA (the handshake
refuses any other, and expired ones). Its common name is the peer's identity and its
organizational unit its role: the Fleet API takes `client` certificates only, the Control
API `operator` ones only. Revoked certificates (the CA-signed `crl.pem`, re-read when it
changes) are refused on every call. Without TLS (`--insecure`) there is no identity and
every caller is accepted: for loopback demos and tests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from server.errors import PermissionDenied, ResourceExhausted, Unauthenticated

log = logging.getLogger("leptonfl.auth")
CRL_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    serial: int


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


class RevocationList:
    """Serial numbers in a CA-signed CRL file, reloaded whenever the file changes."""

    def __init__(self, path: Path | None, ca_cert: x509.Certificate | None) -> None:
        self.path, self.ca_cert = path, ca_cert
        self._serials: frozenset[int] = frozenset()
        self._stamp: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        if not self.path.exists():
            if self._stamp is not None:  # a vanished list must not un-revoke anyone
                log.error("revocation list %s disappeared; keeping its %d revocations", self.path, len(self._serials))
            return
        stamp = self.path.stat().st_mtime
        if stamp == self._stamp:
            return
        crl = x509.load_pem_x509_crl(self.path.read_bytes())
        if self.ca_cert is not None and not crl.is_signature_valid(self.ca_cert.public_key()):  # type: ignore[arg-type]
            log.error("ignoring %s: not signed by the deployment's CA", self.path)
            return
        self._serials, self._stamp = frozenset(r.serial_number for r in crl), stamp
        log.info("revocation list loaded: %d revoked certificates", len(self._serials))

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            if time.monotonic() - self._checked > CRL_CHECK_INTERVAL_S:
                self._checked = time.monotonic()
                self._reload()
            return serial in self._serials


class Authorizer:
    """Checks the caller of every RPC; `tls=False` accepts everyone (insecure mode)."""

    def __init__(self, tls: bool, ca_path: Path | None = None, crl_path: Path | None = None) -> None:
        self.tls = tls
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes()) if ca_path else None
        self.revocations = RevocationList(crl_path, ca)
        self._cache: dict[bytes, Identity] = {}

    def identity(self, context: grpc.ServicerContext) -> Identity | None:
        if not self.tls:
            return None
        pems: list[bytes] = list(context.auth_context().get("x509_pem_cert") or [])  # type: ignore[arg-type]
        if not pems:
            raise Unauthenticated("a client certificate is required")
        pem = pems[0]
        key = hashlib.sha256(pem).digest()
        identity = self._cache.get(key)
        if identity is None:
            cert = x509.load_pem_x509_certificate(pem)
            identity = Identity(
                _attribute(cert, NameOID.COMMON_NAME),
                _attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
                cert.serial_number,
            )
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = identity
        if self.revocations.is_revoked(identity.serial):
            raise Unauthenticated(f"certificate of {identity.name!r} has been revoked")
        return identity

    def require(self, context: grpc.ServicerContext, role: str) -> Identity | None:
        identity = self.identity(context)
        if identity is not None and identity.role != role:
            kind = identity.role or "role-less"
            article = "an" if kind[0] in "aeiou" else "a"
            raise PermissionDenied(f"{article} {kind} certificate cannot call this API; {role} only")
        return identity


class RateLimiter:
    """Token buckets per key: `rate` events per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, what: str) -> None:
        self.rate, self.burst, self.what = rate, burst, what
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                raise ResourceExhausted(f"too many {self.what}; slow down (limit {self.rate:g}/s)")
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget idle peers rather than grow without bound
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
