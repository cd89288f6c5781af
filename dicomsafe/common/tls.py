"""TLS material in one place: certificate files from the environment, gRPC credentials for
mutual TLS, stdlib ``ssl`` contexts (TLS 1.3 minimum), and service identities.

Every service holds one certificate (cert-manager in the cluster, ``tools.pki`` for the demo
and tests) that carries its identity as a URI SAN ``spiffe://dicomsafe/<name>``. The same
certificate serves its listener and authenticates it as a client of other services.

Plaintext is a development escape hatch only: a service without TLS files refuses to start
unless ``DICOMSAFE_INSECURE_DEV=1`` says so explicitly.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from dicomsafe.common.config import ConfigError, env_opt
from dicomsafe.common.tls13_pin import require_pinned

log = logging.getLogger("dicomsafe.tls")

TRUST_DOMAIN = "dicomsafe"
IDENTITY_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
INSECURE_OPT_OUT = "DICOMSAFE_INSECURE_DEV"


def identity_uri(name: str) -> str:
    """The URI SAN naming one service (or tool) identity."""
    return IDENTITY_PREFIX + name


@dataclass(frozen=True)
class TlsConfig:
    """Paths of this workload's certificate chain, private key and the CA bundle it trusts.

    Paths rather than contents: stdlib ``ssl`` loads key pairs only from files, and a gRPC
    server re-reads them when they change (a renewed certificate needs no restart; clients and
    ``ssl`` contexts pick one up when they are next built).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            # The path is not secret; the contents are never echoed.
            raise ConfigError(f"cannot read TLS {what} ({path}): {exc.strerror}") from exc

    def _server_configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (self._read(self.key_file, "key"), self._read(self.cert_file, "certificate"))
        return grpc.ssl_server_certificate_configuration(
            [pair], root_certificates=self._read(self.ca_file, "CA bundle")
        )

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        stamps = []
        for path in (self.cert_file, self.key_file, self.ca_file):
            try:
                st = path.stat()
            except OSError:
                return ()
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client certificate signed by our CA is required on every connection.

        The files are looked at again before each new connection's handshake, so a renewed
        certificate (cert-manager rewrites the Secret's files) is served without a restart;
        a half-written or unreadable set keeps the previous one.
        """
        require_pinned()
        seen = self._stamp()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            current = self._stamp()
            if not current or current == seen:
                return None
            try:
                configuration = self._server_configuration()
            except ConfigError:
                log.warning("TLS files changed but cannot be read; serving the previous certificate")
                return None
            seen = current
            log.info("TLS certificate reloaded")
            return configuration

        # The stubs omit it, but grpc documents None from the fetcher as "keep the current one".
        return grpc.dynamic_ssl_server_credentials(
            self._server_configuration(),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verifies the server against our CA and presents this workload's own certificate."""
        require_pinned()
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_file, "CA bundle"),
            private_key=self._read(self.key_file, "key"),
            certificate_chain=self._read(self.cert_file, "certificate"),
        )

    def server_ssl_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        """A TLS 1.3-only server context (HTTPS listeners); client certificates verified
        against our CA, and required when ``require_client_cert``."""
        ctx = tls13_server_context(self.cert_file, self.key_file)
        ctx.load_verify_locations(cafile=self.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A TLS 1.3-only client context: verifies the server (name and chain) against our CA
        and presents this workload's certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def tls13_server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A server context that refuses TLS 1.2 and older at the handshake; no client certificates
    (a user-facing listener such as DICOMweb authenticates its callers with tokens)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def insecure_dev_allowed() -> bool:
    return env_opt(INSECURE_OPT_OUT) == "1"


def tls_from_env() -> TlsConfig | None:
    """``TLS_CERT_FILE``, ``TLS_KEY_FILE``, ``TLS_CA_FILE`` (all three, or none).

    None only with none of them set and the explicit plaintext opt-out; anything else that
    lacks TLS is a configuration error, so a forgotten secret mount cannot downgrade a service.
    """
    cert, key, ca = env_opt("TLS_CERT_FILE"), env_opt("TLS_KEY_FILE"), env_opt("TLS_CA_FILE")
    given = [v for v in (cert, key, ca) if v]
    if len(given) == 3:
        return TlsConfig(Path(cert), Path(key), Path(ca))
    if given:
        raise ConfigError("TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE must be set together")
    if env_opt("DICOMSAFE_INSECURE_DEV") == "1":
        return None
    raise ConfigError(
        "TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE are required "
        f"(plaintext only for local development, with {INSECURE_OPT_OUT}=1)"
    )


def require_tls_or_opt_out(tls: TlsConfig | None, what: str) -> None:
    """Guard for code paths handed a config built in code rather than by ``tls_from_env``."""
    if tls is None and not insecure_dev_allowed():
        raise ConfigError(f"{what} without TLS needs the explicit opt-out {INSECURE_OPT_OUT}=1")


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The verified identity (``spiffe://dicomsafe/<name>`` → ``name``) of a gRPC peer, or None
    (plaintext, or a certificate without exactly one dicomsafe SPIFFE id).

    grpc core sets ``peer_spiffe_id`` only for a certificate the handshake verified against our
    CA that carries exactly one URI SAN, and that one a SPIFFE id.
    """
    ids = list(auth_context.get("peer_spiffe_id", ()))
    if len(ids) != 1:
        return None
    uri = ids[0].decode("ascii", "replace")
    if not uri.startswith(IDENTITY_PREFIX):
        return None
    name = uri[len(IDENTITY_PREFIX) :]
    return name if name and "/" not in name else None


def negotiated_tls_version(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    versions = list(auth_context.get("ssl_tls_version", ()))
    return versions[0].decode("ascii", "replace") if versions else ""
