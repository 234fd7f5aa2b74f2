"""TLS certificates for a deployment: a private CA and a server certificate it signs, made with
pyca/cryptography's x509 API (no openssl shell-out).

Flower's SuperLink serves TLS with ``--ssl-certfile server.pem --ssl-keyfile server.key
--ssl-ca-certfile ca.crt``; SuperNodes and the ``flwr`` CLI trust ``ca.crt``. Keys are ECDSA
P-256 (what gRPC and every TLS 1.3 stack accept); the server certificate names every host the
clients will dial (DNS names and IP addresses as subject alternative names).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.files import write_new

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


class CertificateError(ValueError):
    """Certificates cannot be made as asked (bad host name, files in the way)."""


@dataclass(frozen=True)
class CertificateFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlearn"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")  # RFC 1123 host names, ASCII only


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not DNS_NAME.fullmatch(host):
                raise CertificateError(f"--host {host!r} is neither an IP address nor a DNS name (letters, digits, "
                                       "'-' and '.'; a non-ASCII name in its IDNA 'xn--' form)") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def generate(directory: Path, hosts: list[str] | None = None, days: int = 365) -> CertificateFiles:
    """Write ca.crt, ca.key (0600), server.pem and server.key (0600) into ``directory``; never
    overwrite: if any of them exists, nothing is written."""
    hosts = list(hosts or DEFAULT_HOSTS)
    if days < 1:
        raise CertificateError(f"--days {days}: must be >= 1")
    san = _san(hosts)
    directory = Path(directory)
    existing = [name for name in FILES if (directory / name).exists()]
    if existing:
        raise CertificateError(f"{directory} already holds {', '.join(existing)}: choose another --out or move them away")
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedlearn deployment CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return CertificateFiles(
        write_new(directory / "ca.crt", ca_cert.public_bytes(pem), private=False),
        write_new(directory / "ca.key", _pem_key(ca_key), private=True),
        write_new(directory / "server.pem", server_cert.public_bytes(pem), private=False),
        write_new(directory / "server.key", _pem_key(server_key), private=True),
    )


@dataclass(frozen=True)
class SuperNodeAuthKeys:
    private_key: Path
    public_key: Path


def generate_supernode_auth(directory: Path, name: str) -> SuperNodeAuthKeys:
    """Write NAME.auth.key (0600) and NAME.auth.pub: the key pair Flower's SuperNode
    authentication uses (`flower-supernode --auth-supernode-private-key`, `flwr supernode
    register`). Flower accepts only NIST EC curves in OpenSSH format: P-384 here.

    It is the node's transport identity; fedlearn's update signatures use the node's Ed25519
    key (``fedlearn keys generate``), so stealing one does not give the other."""
    directory = Path(directory)
    private, public = directory / f"{name}.auth.key", directory / f"{name}.auth.pub"
    existing = [p.name for p in (private, public) if p.exists()]
    if existing:
        raise CertificateError(f"{directory} already holds {', '.join(existing)}: choose another --name or --out")
    key = ec.generate_private_key(ec.SECP384R1())
    ssh_private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    ssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SuperNodeAuthKeys(
        write_new(private, ssh_private, private=True), write_new(public, ssh_public + b"\n", private=False)
    )
