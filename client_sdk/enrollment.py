"""Enrollment: trade a one-time token from the operator for this client's certificate.

The key is generated here and never leaves this machine: only a certificate signing
request goes to the daemon's enrollment port (server-authenticated TLS, verified against
the deployment's `ca.pem`). The result is laid out like a certificates dir of
`leptonfl certs`, so `leptonfl client --certs DIR --name NAME` and
`TLSFiles.from_dir(DIR, "clients/NAME")` use it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client_sdk.errors import ConnectionFailed, EnrollmentRefused, LeptonError, ProtocolMismatch, from_rpc_error
from protos import PROTOCOL_VERSION
from protos.channels import TLSFiles, write_private_key
from protos.v1 import enrollment_pb2, enrollment_pb2_grpc


@dataclass(frozen=True)
class Enrollment:
    name: str  # the client name the token was issued for: this client's identity
    tls: TLSFiles


def enroll(address: str, token: str, ca: Path, out_dir: Path, timeout: float = 30.0) -> Enrollment:
    """Generate a key, have the daemon at `address` (its enrollment port) certify it for the
    client the token names, and write `out_dir/ca.pem` and `out_dir/clients/NAME.pem/.key`."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    request = enrollment_pb2.EnrollRequest(
        protocol_version=PROTOCOL_VERSION, token=token, csr_pem=csr.public_bytes(serialization.Encoding.PEM)
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    except OSError as exc:
        raise LeptonError(f"cannot read the CA certificate: {exc}") from exc
    try:
        with grpc.secure_channel(address, credentials) as channel:
            reply = enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=timeout)
    except grpc.RpcError as exc:
        error = from_rpc_error(exc, f"enrollment at {address}")
        if error.code == "DEADLINE_EXCEEDED":  # no answer in time: as unreachable as UNAVAILABLE
            error = ConnectionFailed(str(error), error.code)
        elif not isinstance(error, ConnectionFailed | ProtocolMismatch):  # the daemon said no
            error = EnrollmentRefused(str(error), error.code)
        raise error from exc
    stem = out_dir / "clients" / reply.client_name
    write_private_key(stem.with_suffix(".key"), key)
    stem.with_suffix(".pem").write_bytes(reply.certificate_pem)
    (out_dir / "ca.pem").write_bytes(reply.ca_certificate_pem)
    return Enrollment(reply.client_name, TLSFiles.from_dir(out_dir, f"clients/{reply.client_name}"))
