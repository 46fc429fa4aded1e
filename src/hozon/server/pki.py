"""The server's own certificate authority and TLS certificate, and the fingerprint users pin.

``server init`` makes a CA (ECDSA P-256, ten years) and a server certificate it signs (two years)
naming every address the server answers on. Agents and admin clients trust that CA only: they get
its SHA-256 fingerprint out of band (printed at init, carried in enrolment tokens) and pin it on
first contact, so no public CA and no trust-on-first-use of an unverified key is involved.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hozon.https import fingerprint as fingerprint  # what users pin; agents compute it too
from hozon.https import normalise_fingerprint as normalise_fingerprint
from hozon.server.paths import ServerDir, write_private

CA_DAYS = 3650
SERVER_DAYS = 730


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hozon"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(server_dir: ServerDir) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("Hozon server CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _save(server_dir.ca_cert, server_dir.ca_key, cert, key)


def create_server_cert(server_dir: ServerDir, names: list[str]) -> None:
    """A server certificate for ``names`` (DNS names or IP addresses), signed by the server's CA."""
    ca_cert = x509.load_pem_x509_certificate(server_dir.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(server_dir.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys([*names, "localhost", "127.0.0.1", "::1"]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder().subject_name(_name(names[0] if names else "localhost"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _save(server_dir.server_cert, server_dir.server_key, cert, key)


def _save(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
