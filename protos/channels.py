"""Opening gRPC channels to a Lepton FL daemon, with or without TLS.

Shared by the client SDK and the operator's Control client, so both speak TLS the same way:
`TLSFiles` names the CA that signed the server's certificate and, for mutual TLS, this
peer's own certificate and key; `write_private_key` stores a key as provisioning and
enrollment both must (mode 0600).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TLSFiles:
        """`ca.pem` plus `<name>.pem`/`<name>.key` (e.g. `operator`, or `clients/alice`) of a certs dir."""
        return cls(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key")

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            ca = self.ca.read_bytes()
            cert = self.cert.read_bytes() if self.cert else None
            key = self.key.read_bytes() if self.key else None
        except OSError as exc:
            raise ValueError(f"cannot read TLS file: {exc}") from exc
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(address: str, tls: TLSFiles | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A secure channel when `tls` is given, else plaintext (loopback and private networks only)."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=list(options))


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
