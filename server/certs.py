"""Certificates and SuperNode keys for trials: a CA, a server certificate, node key pairs.

Flower's SuperLink serves TLS with a certificate the SuperNodes verify against a CA, and
authenticates SuperNodes by ECDSA keys in OpenSSH format (what `ssh-keygen -t ecdsa -b 384`
writes and `flwr supernode register` takes). This writes both with `cryptography` (a Flower
dependency), so a trial needs no openssl or ssh-keygen. For production, use your own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.artifacts import OutputExistsError
from common.errors import DataError

VALID_DAYS = 365


def create(out: Path, hosts: list[str], nodes: int) -> list[Path]:
    """`ca.crt`/`ca.key`, `server.crt`/`server.key` (valid for `hosts`, names or IPs) and
    `node-<i>`/`node-<i>.pub` for i in 1..nodes under `out`; returns the files written.

    Refuses to overwrite: replacing a CA silently would lock every deployed node out.
    """
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"node-{i}{ext}" for i in range(1, nodes + 1) for ext in ("", ".pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise OutputExistsError(f"{out / existing[0]} already exists: certificates are never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec trial CA")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, server_key.public_key())
              .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    written = [_write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
               _write(out / "ca.key", _pem_key(ca_key), private=True),
               _write(out / "server.crt", server.public_bytes(serialization.Encoding.PEM)),
               _write(out / "server.key", _pem_key(server_key), private=True)]
    for i in range(1, nodes + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        written += [_write(out / f"node-{i}", private, private=True),
                    _write(out / f"node-{i}.pub", public + f" fedrec-node-{i}\n".encode())]
    return written


def check_certificates(path: Path, option: str) -> None:
    """Refuse a file that holds no PEM certificate: Flower would print a traceback and keep running."""
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise DataError(f"{option} {path} holds no valid PEM certificate: give the CA certificate "
                        "that signed the server's, e.g. ca.crt from `fedrec certs`") from None
    except OSError as e:
        raise DataError(f"{option} {path}: cannot read: {e.strerror}") from None


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Private keys are created readable by their owner only (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
