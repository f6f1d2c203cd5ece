"""Enrollment service: trades a one-time token and a CSR for a client certificate.

Served only on the daemon's enrollment port, where callers have no certificate yet, so it
trusts nothing but the token: checked (signature, expiry) before anything is written,
redeemed in the database before the certificate is signed, rate-limited per peer address.
The certificate is also written to `clients/NAME.pem` of the certificates dir, so
`leptonfl certs revoke NAME` and `--rotate` treat enrolled clients like provisioned ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protos.v1 import enrollment_pb2 as pb
from protos.v1 import enrollment_pb2_grpc
from server.auth import RateLimiter
from server.engine import check_protocol
from server.enrollment import requested_key, verify_token
from server.errors import AlreadyExists, PermissionDenied
from server.metrics import DaemonMetrics
from server.provisioning import ROLE_CLIENT, client_cert, load_ca, sign_certificate
from server.servicers.status import unary
from server.store import Store

log = logging.getLogger("leptonfl.enrollment")


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(self, store: Store, certs_dir: Path, metrics: DaemonMetrics, rate: float = 1.0) -> None:
        self.store, self.metrics = store, metrics
        self.ca = load_ca(certs_dir)
        self.ca_pem = self.ca[0].public_bytes(serialization.Encoding.PEM)
        self.certs_dir = certs_dir
        self.limit = RateLimiter(rate, burst=5, what="enrollments")

    @unary
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        self.limit.check(context.peer().rsplit(":", 1)[0])
        check_protocol(request.protocol_version)
        claim = verify_token(request.token, self.ca[0])
        key = requested_key(request.csr_pem)
        path = client_cert(self.certs_dir, claim.name)
        if path.exists():
            raise AlreadyExists(
                f"client {claim.name!r} already has a certificate; the operator must revoke it first "
                f"(`leptonfl certs revoke {claim.name}`)"
            )
        serial = x509.random_serial_number()
        if not self.store.redeem_enrollment(claim.token_id, claim.name, serial):
            raise PermissionDenied(f"this enrollment token for {claim.name!r} has already been used")
        cert = sign_certificate(self.ca, key, claim.name, ROLE_CLIENT, claim.days, serial=serial)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as exc:  # a concurrent enrollment with another token won
            raise AlreadyExists(f"client {claim.name!r} was enrolled concurrently") from exc
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        log.info("enrolled client %s (certificate serial %x, %d days)", claim.name, serial, claim.days)
        return pb.EnrollResponse(client_name=claim.name, certificate_pem=pem, ca_certificate_pem=self.ca_pem)
