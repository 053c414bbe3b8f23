"""TLS material for a coordinator: a self-signed CA and a server certificate signed by it.

Contributors dial the coordinator's SuperLink over TLS; they verify it against the CA certificate the
coordinator hands them (``ca.pem``), so there is no public CA or DNS name to buy. Generation is
idempotent: an existing CA is kept (contributors already hold it) and the server certificate is only
re-issued when it no longer covers the hosts contributors dial (it then covers the old and the new ones) or
is close to expiring. Rotation: deleting ``server.pem``/``server.key`` re-issues the server certificate from
the same CA (contributors do nothing); deleting ``ca.pem``/``ca.key`` makes a new CA, which every contributor
must fetch again. Threat: whoever holds ``ca.key`` can impersonate the coordinator, so it is written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.files import atomic_write_bytes

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the coordinator's TLS files (``ca`` is what contributors need)."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path


def tls_paths(tls_dir: Path) -> TlsFiles:
    """Where :func:`ensure_tls` keeps its files inside ``tls_dir``."""
    return TlsFiles(tls_dir / "ca.pem", tls_dir / "ca.key", tls_dir / "server.pem", tls_dir / "server.key")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _covered_hosts(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def normalize_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    """Hosts a certificate must cover: the given ones plus loopback, without wildcard bind addresses."""
    wanted = [h.strip("[]") for h in hosts if h and h not in ("0.0.0.0", "::", "[::]")]
    return sorted(set(wanted) | set(DEFAULT_HOSTS))


def _make_ca(files: TlsFiles, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    atomic_write_bytes(files.ca_key, _key_pem(key), mode=0o600)
    atomic_write_bytes(files.ca, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _make_server(files: TlsFiles, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    atomic_write_bytes(files.key, _key_pem(key), mode=0o600)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))


def ensure_tls(tls_dir: Path, hosts: list[str] | tuple[str, ...], name: str = "fedtune coordinator") -> TlsFiles:
    """Create (or reuse) the CA and a server certificate whose SAN covers ``hosts`` and loopback.

    The CA is never replaced once it exists, because contributors pin it; the server certificate is
    re-issued from that CA when a new host is requested or it is within 30 days of expiry.
    """
    files = tls_paths(Path(tls_dir))
    wanted = normalize_hosts(hosts)
    if files.ca.exists() and files.ca_key.exists():
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{files.ca_key}: expected an EC private key")
    else:
        ca, ca_key = _make_ca(files, name)
    if files.cert.exists() and files.key.exists():
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        fresh = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
        covered = _covered_hosts(cert)
        if fresh and set(wanted) <= covered and cert.issuer == ca.subject:
            return files
        if cert.issuer == ca.subject:  # keep serving the addresses other campaigns of this home use
            wanted = sorted(set(wanted) | covered)
    _make_server(files, ca, ca_key, wanted)
    return files
