"""Certificates for a Lepton FL deployment, made with `cryptography`.

`leptonfl certs init DIR` creates a CA, a server certificate for the given host names/IPs,
and an operator credential; `leptonfl certs client NAME` issues a client certificate;
`leptonfl certs revoke NAME` adds a certificate to the CA-signed revocation list (CRL) the
daemon reloads. Who a peer is comes from its certificate: the common name is its identity
and the organizational unit its role (`client` or `operator`). Private keys are written 0600.

Layout of DIR:
    ca.pem ca.key                   the certificate authority (keep ca.key offline when you can)
    server.pem server.key           the daemon's certificate
    operator.pem operator.key       for `leptonfl run ...`
    clients/NAME.pem NAME.key       one per client
    crl.pem                         revoked certificates
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protos.channels import write_private_key

ROLE_CLIENT, ROLE_OPERATOR, ROLE_SERVER = "client", "operator", "server"
DEFAULT_DAYS = 365


class ProvisioningError(RuntimeError):
    """A provisioning step cannot be done (missing CA, name taken, bad host)."""


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lepton FL"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ProvisioningError(f"no CA in {directory}: run `leptonfl certs init {directory}` first") from exc
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def sign_certificate(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    public_key: CertificatePublicKeyTypes,
    common_name: str,
    role: str,
    days: int,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """A certificate for `public_key` naming `common_name` in `role`, signed by the CA."""
    ca_cert, ca_key = ca
    start = not_before or _now() - dt.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == ROLE_SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, role))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _issue(
    directory: Path,
    stem: Path,
    common_name: str,
    role: str,
    days: int,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
) -> Credential:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_certificate(load_ca(directory), key.public_key(), common_name, role, days, hosts, not_before)
    credential = Credential(stem.with_suffix(".pem"), stem.with_suffix(".key"))
    write_private_key(credential.key, key)
    _write_cert(credential.cert, cert)
    return credential


def init_ca(directory: Path, hosts: Sequence[str], days: int = 3650) -> dict[str, Credential]:
    """A new CA, a server certificate for `hosts`, an operator credential and an empty CRL."""
    if (directory / "ca.key").exists():
        raise ProvisioningError(f"{directory} already holds a CA; refusing to overwrite it")
    if not hosts:
        raise ProvisioningError("name at least one host name or IP address for the server certificate")
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("Lepton FL CA", "ca")
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_private_key(directory / "ca.key", key)
    _write_cert(directory / "ca.pem", cert)
    write_crl(directory, [])
    return {
        "ca": Credential(directory / "ca.pem", directory / "ca.key"),
        "server": _issue(directory, directory / "server", hosts[0], ROLE_SERVER, DEFAULT_DAYS, hosts),
        "operator": _issue(directory, directory / "operator", "operator", ROLE_OPERATOR, DEFAULT_DAYS),
    }


def issue_client(
    directory: Path, name: str, days: int = DEFAULT_DAYS, not_before: dt.datetime | None = None
) -> Credential:
    """A client certificate whose common name `name` becomes the client's identity."""
    check_new_client(directory, name)
    return _issue(directory, directory / "clients" / name, name, ROLE_CLIENT, days, not_before=not_before)


def client_cert(directory: Path, name: str) -> Path:
    """Where client `name`'s current certificate lives in a certificates dir."""
    return directory / "clients" / f"{name}.pem"


def check_new_client(directory: Path, name: str) -> None:
    """Refuse a malformed client name, or one that already has a (non-revoked) certificate."""
    if not name or len(name) > 64 or not name[0].isalnum() or not all(c.isalnum() or c in "-_." for c in name):
        raise ProvisioningError(
            "client names are 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    if client_cert(directory, name).exists():
        raise ProvisioningError(
            f"client {name!r} already has a certificate; replace it with `leptonfl certs client {name} --rotate`"
        )


def revoked_serials(directory: Path) -> list[int]:
    path = directory / "crl.pem"
    if not path.exists():
        return []
    return [r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())]


def write_crl(directory: Path, serials: Sequence[int]) -> Path:
    ca_cert, ca_key = load_ca(directory)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(_now())
        .next_update(_now() + dt.timedelta(days=30))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = directory / "crl.pem"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)  # the daemon never sees a half-written list
    return path


def revoke(directory: Path, cert_path: Path) -> int:
    """Add the certificate at `cert_path` to the CRL; returns its serial number."""
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    serials = revoked_serials(directory)
    if serial not in serials:
        write_crl(directory, [*serials, serial])
    return serial


def revoke_client(directory: Path, name: str) -> int:
    """Revoke client `name`'s certificate and set its files aside (`NAME.pem.revoked-SERIAL`),
    so the name can be issued again; returns the revoked serial number."""
    current = client_cert(directory, name)
    if not current.exists():
        raise ProvisioningError(f"client {name!r} has no certificate in {current.parent}")
    serial = revoke(directory, current)
    for path in (current, current.with_suffix(".key")):  # enrolled clients keep their key: no .key here
        if path.exists():
            path.rename(path.with_name(f"{path.name}.revoked-{serial:x}"))
    return serial
