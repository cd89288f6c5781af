"""MongoDB over (mutual) TLS: the services' MongoDB clients need nothing but the URI.

A MongoDB-wire server of its own (SecantusDB) listens with TLS only and asks for a client
certificate; the audit store — the most sensitive MongoDB user — appends and verifies through
it, a plaintext client and a client without a certificate get nowhere, and the handshake our
client stack makes is TLS 1.3.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import PyMongoError

from dicomsafe.v1 import audit_pb2
from services.audit.store import AuditStore
from tools import infra
from tools.pki import Pki
from tools.ports import free_port


@dataclass(frozen=True)
class TlsMongo:
    port: int
    ca_file: Path
    client_pem: Path  # certificate and key in one file, as MongoDB drivers take them

    def uri(self, tls: bool = True, client_cert: bool = True) -> str:
        base = f"mongodb://127.0.0.1:{self.port}/?directConnection=true&serverSelectionTimeoutMS=3000"
        if not tls:
            return base
        uri = f"{base}&tls=true&tlsCAFile={quote(str(self.ca_file))}"
        return f"{uri}&tlsCertificateKeyFile={quote(str(self.client_pem))}" if client_cert else uri


@pytest.fixture(scope="module")
def tls_mongo(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMongo]:
    tmp_path = tmp_path_factory.mktemp("tls-mongo")
    server = pki.issue("mongo")
    client = pki.issue("audit")
    client_pem = tmp_path / "audit-client.pem"
    client_pem.write_bytes(client.cert_file.read_bytes() + client.key_file.read_bytes())
    client_pem.chmod(0o600)
    (tmp_path / "secantusd.toml").write_text("", encoding="utf-8")  # no config auto-discovery
    port = free_port()
    cmd = [
        infra.secantusd_binary(),
        "--config", str(tmp_path / "secantusd.toml"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--storage-path", str(tmp_path / "data"),
        "--tls-cert-file", str(server.cert_file),
        "--tls-key-file", str(server.key_file),
        "--tls-ca-file", str(pki.ca_file),
        "--tls-require-client-cert",
    ]  # fmt: skip
    with (tmp_path / "mongo.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    mongo = TlsMongo(port, pki.ca_file, client_pem)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                probe: MongoClient[dict[str, Any]] = MongoClient(mongo.uri(), serverSelectionTimeoutMS=500)
                with probe:
                    probe.admin.command("ping")
                break
            except PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"TLS SecantusDB did not start; see {tmp_path / 'mongo.log'}") from None
                time.sleep(0.3)
        yield mongo
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            # A TLS connection the server is still tearing down can hold up its shutdown; this
            # is a throwaway server of the test's own.
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture
async def tls_client(tls_mongo: TlsMongo) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(tls_mongo.uri())
    yield client
    await client.close()


def _event(i: int) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        service="gateway",
        action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
        actor=f"user-{i % 7}",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    )
    event.occurred_at.GetCurrentTime()
    return event


async def test_the_audit_store_appends_and_verifies_over_mutual_tls(
    tls_client: AsyncMongoClient[dict[str, Any]],
) -> None:
    store = AuditStore(tls_client, "dicomsafe_audit_tls")
    await store.ensure_indexes()
    assert await store.append_many("tls:0", [_event(i) for i in range(50)]) == list(range(1, 51))
    verdict = await store.verify()
    assert verdict.ok and verdict.records == 50


def test_plaintext_and_certificate_less_clients_get_nowhere(tls_mongo: TlsMongo) -> None:
    for uri in (tls_mongo.uri(tls=False), tls_mongo.uri(client_cert=False)):
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        with client, pytest.raises(PyMongoError):
            client.admin.command("ping")


def test_the_handshake_is_tls13(tls_mongo: TlsMongo, pki: Pki) -> None:
    """What our side negotiates with a server that offers 1.3 (the Python TLS stack the driver
    uses): 1.3. That the *server* refuses 1.2 is the server's own configuration (MongoDB:
    `net.tls.disabledProtocols: TLS1_0,TLS1_1,TLS1_2`), see docs/operations.md."""
    context = ssl.create_default_context(cafile=str(tls_mongo.ca_file))
    context.load_cert_chain(str(tls_mongo.client_pem))
    with (
        socket.create_connection(("127.0.0.1", tls_mongo.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
