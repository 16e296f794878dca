"""Throwaway certificate authorities and certificates for the TLS tests.

Keys are 2048-bit RSA: every TLS stack in the tests (OpenSSL through
Python and libpq, Erlang's ssl application in RabbitMQ) accepts them.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Days a certificate stays valid, unless it is issued as expired.
VALIDITY_DAYS = 2


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'mikkoo tests'),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A private key and the certificate for it."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: str | None = None) -> bytes:
        """Return the key as PKCS#8 PEM, encrypted when ``password`` is given."""
        encryption: serialization.KeySerializationEncryption
        if password is None:
            encryption = serialization.NoEncryption()
        else:
            encryption = serialization.BestAvailableEncryption(password.encode())
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8, encryption)

    def write(self, directory: Path, stem: str,
              password: str | None = None) -> tuple[Path, Path]:
        """Write ``STEM.pem`` and ``STEM.key`` (mode 0600); return their paths."""
        certificate_path = directory / f'{stem}.pem'
        key_path = directory / f'{stem}.key'
        certificate_path.write_bytes(self.certificate_pem())
        key_path.write_bytes(self.key_pem(password))
        key_path.chmod(0o600)
        return certificate_path, key_path


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str) -> None:
        key = _new_key()
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
        self.pair = KeyPair(key, certificate)

    def certificate_pem(self) -> bytes:
        return self.pair.certificate_pem()

    def issue(self, common_name: str, *, dns_names: tuple[str, ...] = (),
              ip_addresses: tuple[str, ...] = (), client: bool = False,
              expired: bool = False) -> KeyPair:
        """Issue a server certificate, or a client one when ``client`` is true.

        The subject alternative names are ``dns_names`` and ``ip_addresses``;
        an ``expired`` certificate ended a day before it is issued.
        """
        key = _new_key()
        now = _now()
        if expired:
            not_before = now - datetime.timedelta(days=3)
            not_after = now - datetime.timedelta(days=1)
        else:
            not_before = now - datetime.timedelta(hours=1)
            not_after = now + datetime.timedelta(days=VALIDITY_DAYS)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.pair.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.pair.key.public_key()), critical=False))
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names),
                                            critical=False)
        return KeyPair(key, builder.sign(self.pair.key, hashes.SHA256()))


# Password of the encrypted client key. Tests check that it never appears
# in mikkoo's log, so it is a string that nothing else prints.
KEY_PASSWORD = 'key-pass-7Qx2'


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """The PEM files of the TLS tests, in one directory."""

    directory: Path
    ca: Path                    # the CA that signed everything below
    other_ca: Path              # a CA that signed nothing the servers use
    server: Path                # names 127.0.0.1 and localhost
    server_key: Path
    localhost_server: Path      # names localhost only
    localhost_server_key: Path
    expired_server: Path
    expired_server_key: Path
    client: Path
    client_key: Path
    encrypted_client: Path
    encrypted_client_key: Path  # encrypted with KEY_PASSWORD
    untrusted_client: Path      # signed by other_ca
    untrusted_client_key: Path


def write_tls_files(directory: Path) -> TLSFiles:
    """Create the CAs, certificates and keys of the TLS tests in ``directory``.

    Certificates are world-readable; keys are readable by the owner only.
    """
    authority = Authority('mikkoo test CA')
    other = Authority('mikkoo other CA')
    ca = directory / 'ca.pem'
    ca.write_bytes(authority.certificate_pem())
    other_ca = directory / 'other-ca.pem'
    other_ca.write_bytes(other.certificate_pem())

    server = authority.issue('127.0.0.1', dns_names=('localhost',),
                             ip_addresses=('127.0.0.1',)).write(directory, 'server')
    localhost_server = authority.issue('localhost', dns_names=('localhost',)).write(
        directory, 'localhost-server')
    expired_server = authority.issue('127.0.0.1', dns_names=('localhost',),
                                     ip_addresses=('127.0.0.1',), expired=True).write(
        directory, 'expired-server')
    client = authority.issue('mikkoo client', client=True).write(directory, 'client')
    encrypted_client = authority.issue('mikkoo encrypted client', client=True).write(
        directory, 'encrypted-client', password=KEY_PASSWORD)
    untrusted_client = other.issue('mikkoo untrusted client', client=True).write(
        directory, 'untrusted-client')
    return TLSFiles(directory, ca, other_ca, *server, *localhost_server, *expired_server,
                     *client, *encrypted_client, *untrusted_client)
