"""A throwaway certificate authority for the demo, the tests and the Compose stack
(cert-manager's job in a cluster).

One CA and one certificate per workload identity, ECDSA P-256, short-lived: each carries its
identity as the URI SAN ``spiffe://dicomsafe/<name>`` (what servers authorise), its name as a
DNS SAN (Compose/Kubernetes service names) plus ``localhost``/``127.0.0.1`` so loopback targets
verify. Keys are written owner-readable only.

    python -m tools.pki DIR [--hours N]   # DIR/ca.crt, DIR/<identity>.crt|.key; kept while valid
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicomsafe.common.tls import TlsConfig, identity_uri

# Every identity the services' default allowlists name: the five services, operator tooling
# (key rotation, erasure, audit queries) and trusted retrieval front ends.
IDENTITIES = ("crypto", "authz", "audit", "gateway", "ingest", "ops", "viewer")
VALIDITY = dt.timedelta(hours=12)
# The CLI starts over when the CA has less than this left, so a long-lived Compose stack
# re-issued on `up` never runs into an expiry.
RENEW_BEFORE = dt.timedelta(days=1)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Pki:
    directory: Path
    validity: dt.timedelta = VALIDITY

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def tls(self, name: str) -> TlsConfig:
        return TlsConfig(self.directory / f"{name}.crt", self.directory / f"{name}.key", self.ca_file)

    def env(self, name: str) -> dict[str, str]:
        """The TLS settings of a workload holding identity ``name``."""
        t = self.tls(name)
        return {"TLS_CERT_FILE": str(t.cert_file), "TLS_KEY_FILE": str(t.key_file), "TLS_CA_FILE": str(t.ca_file)}

    def issue(self, name: str, uris: Iterable[str] | None = None) -> TlsConfig:
        """A certificate named ``name`` signed by this CA; ``uris`` replaces the identity SAN
        (tests use it for certificates with no identity or a foreign one)."""
        ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TypeError("the CA key must be ECDSA")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(u) for u in (uris if uris is not None else [identity_uri(name)])
        ]
        sans += [x509.DNSName(name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + self.validity, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(self.directory / f"{name}.key", _key_pem(key), private=True)
        _write(self.directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return self.tls(name)


def make_pki(directory: Path, identities: Iterable[str] = IDENTITIES, validity: dt.timedelta = VALIDITY) -> Pki:
    """A new CA in ``directory`` and a certificate for each identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dicomsafe test CA {now:%Y%m%d%H%M%S}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _key_pem(key), private=True)
    _write(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    pki = Pki(directory, validity)
    for identity in identities:
        pki.issue(identity)
    return pki


def _still_valid(directory: Path) -> bool:
    try:
        ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except (OSError, ValueError):
        return False
    return ca.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hours", type=int, default=int(VALIDITY.total_seconds() // 3600))
    args = parser.parse_args()
    if _still_valid(args.directory):
        print(f"certificates in {args.directory} still valid")
        return
    make_pki(args.directory, validity=dt.timedelta(hours=args.hours))
    print(f"CA and certificates for {', '.join(IDENTITIES)} written to {args.directory}")


if __name__ == "__main__":
    main()
