"""TLS configuration, the stdlib contexts, peer allowlists and the secure default (no servers)."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomsafe.common import tls13_pin
from dicomsafe.common.config import ConfigError
from dicomsafe.common.grpc_runtime import new_channel, new_server
from dicomsafe.common.kafka import client_security
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, peer_identity, tls_from_env
from services.audit.config import DEFAULT_ALLOWLIST as AUDIT_ALLOW
from services.authz.config import DEFAULT_ALLOWLIST as AUTHZ_ALLOW
from services.crypto.config import DEFAULT_ALLOWLIST as CRYPTO_ALLOW
from services.gateway.config import DEFAULT_ALLOWLIST as GATEWAY_ALLOW
from services.ingest.config import IngestConfig
from tools.pki import Pki, make_pki

TLS_VARS = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "DICOMSAFE_INSECURE_DEV")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["server", "client"])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in TLS_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_tls_settings_come_as_three_files(clean_env: pytest.MonkeyPatch, pki: Pki) -> None:
    for key, value in pki.env("server").items():
        clean_env.setenv(key, value)
    assert tls_from_env() == pki.tls("server")
    clean_env.delenv("TLS_CA_FILE")
    with pytest.raises(ConfigError, match="must be set together"):
        tls_from_env()


def test_without_tls_a_service_refuses_to_start_unless_explicitly_opted_out(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="DICOMSAFE_INSECURE_DEV=1"):
        tls_from_env()
    with pytest.raises(ConfigError, match="without TLS"):
        new_server([], [], "127.0.0.1:0", tls=None, allow=PeerAllowlist())
    with pytest.raises(ConfigError, match="without TLS"):
        new_channel("127.0.0.1:1", None)
    clean_env.setenv("DICOMSAFE_INSECURE_DEV", "yes")  # only the exact opt-out counts
    with pytest.raises(ConfigError):
        tls_from_env()
    clean_env.setenv("DICOMSAFE_INSECURE_DEV", "1")
    assert tls_from_env() is None


def test_kafka_security_is_plaintext_or_tls13_with_a_certificate(clean_env: pytest.MonkeyPatch, pki: Pki) -> None:
    assert client_security() == {}
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="PLAINTEXT or SSL"):
        client_security()
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "ssl")
    clean_env.setenv("DICOMSAFE_INSECURE_DEV", "1")  # no opt-out from certificates for Kafka TLS
    with pytest.raises(ConfigError, match="needs TLS_CERT_FILE"):
        client_security()
    for key, value in pki.env("client").items():
        clean_env.setenv(key, value)
    settings = client_security()
    assert settings["security_protocol"] == "SSL"
    assert settings["ssl_context"].minimum_version == ssl.TLSVersion.TLSv1_3


def test_an_unreadable_key_is_a_configuration_error(tmp_path: Path, pki: Pki) -> None:
    broken = TlsConfig(pki.tls("server").cert_file, tmp_path / "missing.key", pki.ca_file)
    with pytest.raises(ConfigError, match=r"cannot read TLS key .*missing\.key"):
        broken.server_credentials()


def test_grpc_is_pinned_to_tls13_before_grpc_was_imported() -> None:
    assert os.environ[tls13_pin.CIPHER_SUITES_VAR] == tls13_pin.TLS13_ONLY_CIPHER_SUITES
    tls13_pin.require_pinned()  # tests/__init__ imports dicomsafe first


def test_grpc_imported_before_the_pin_is_refused(pki: Pki) -> None:
    """The pin only works before grpc's first import; a process that got the order wrong must
    not serve TLS 1.2 silently but refuse to build credentials."""
    code = (
        "import grpc, dicomsafe, sys; from pathlib import Path; from dicomsafe.common.tls import TlsConfig\n"
        "TlsConfig(*map(Path, sys.argv[1:4])).server_credentials()"
    )
    t = pki.tls("server")
    env = {k: v for k, v in os.environ.items() if k != tls13_pin.CIPHER_SUITES_VAR}
    done = subprocess.run(
        [sys.executable, "-c", code, str(t.cert_file), str(t.key_file), str(t.ca_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "grpc was imported before GRPC_SSL_CIPHER_SUITES was pinned" in done.stderr


def test_allowlist_syntax_and_deny_by_default() -> None:
    allow = PeerAllowlist.parse(" Seal=ingest ; Open, Describe = gateway,ops ;")
    assert allow.allows("Seal", "ingest") and allow.allows("Describe", "ops")
    assert not allow.allows("Seal", "gateway")
    assert not allow.allows("Rewrap", "ops")  # not listed: nobody
    assert not allow.allows("Seal", None)  # no verified identity: never
    for bad in ("Seal", "Seal=", "=ingest", "Seal=ingest;Open"):
        with pytest.raises(ConfigError):
            PeerAllowlist.parse(bad)


def test_default_allowlists_are_least_privilege() -> None:
    assert CRYPTO_ALLOW.rules == {
        "PrepareSeal": {"ingest", "gateway"},
        "Open": {"gateway"},
        "Describe": {"gateway"},
        "RotateKey": {"ops"},
        "GetKeyStatus": {"ops"},
        "Rewrap": {"ops"},
    }
    assert AUTHZ_ALLOW.rules["Check"] == {"gateway", "audit", "ops"}
    assert AUTHZ_ALLOW.rules["BreakGlass"] == {"gateway"}
    assert AUDIT_ALLOW.rules == {
        "Verify": {"gateway", "ops"},
        "Query": {"gateway", "ops"},
        "QueryPage": {"gateway", "ops"},
    }
    assert GATEWAY_ALLOW.rules == {"Retrieve": {"viewer"}}
    # ingest serves no RPC of its own, only health: every method refused.
    ingest_allow = {f.name: f for f in dataclasses.fields(IngestConfig)}["grpc_allow"].default_factory
    assert callable(ingest_allow) and ingest_allow().rules == {}


def test_peer_identity_needs_exactly_one_dicomsafe_spiffe_id() -> None:
    assert peer_identity({"peer_spiffe_id": [b"spiffe://dicomsafe/ingest"]}) == "ingest"
    assert peer_identity({"peer_spiffe_id": [b"spiffe://elsewhere/ingest"]}) is None
    assert peer_identity({"peer_spiffe_id": [b"spiffe://dicomsafe/a/b"]}) is None
    assert peer_identity({"x509_common_name": [b"ingest"]}) is None  # a CN is not an identity
    assert peer_identity({}) is None


@pytest.fixture
def https_server(pki: Pki) -> Iterator[tuple[int, list[str]]]:
    """A stdlib TLS server with the helper's server context (as the gateway's HTTPS listener
    will use it); records the version of each completed handshake."""
    ctx = pki.tls("server").server_ssl_context(require_client_cert=True)
    listener = socket.create_server(("127.0.0.1", 0))
    done: list[str] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    done.append(str(tls.version()))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], done
    listener.close()
    thread.join(timeout=5)


def test_ssl_contexts_speak_tls13_only(https_server: tuple[int, list[str]], pki: Pki) -> None:
    port, done = https_server
    client = pki.tls("client").client_ssl_context()
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as c,
    ):
        assert c.version() == "TLSv1.3" and c.recv(2) == b"ok"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cafile=pki.ca_file)
    old.load_cert_chain(pki.tls("client").cert_file, pki.tls("client").key_file)
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port)) as raw:
        old.wrap_socket(raw, server_hostname="localhost")
    assert done == ["TLSv1.3"]
