"""Forwarding to an external audit repository: RFC 5424 over TLS 1.3 with RFC 5425 framing,
received by a real TLS listener started here (stdlib ssl), records from a real MongoDB."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2
from services.audit.app import run
from services.audit.store import AuditStore
from services.audit.syslog_forward import SyslogForwarder, SyslogTarget
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, running, with_tls
from tools.pki import Pki

A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
MESSAGE = re.compile(
    r'<(\d+)>1 (\S+) dicomsafe-audit dicomsafe-audit - (\d{6}) \[dicomsafe@32473 chain="([^"]+)" '
    r'seq="(\d+)" hash="([0-9a-f]{64})"\] \ufeff(<AuditMessage>.*</AuditMessage>)$',
    re.DOTALL,
)


def _authority(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (CA cert, server cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / f"{name}-ca.pem", directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@asynccontextmanager
async def _repository(
    cert: Path, key: Path, *, newest_tls: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A syslog receiver: TLS, octet-counted frames (RFC 5425) into a list."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.maximum_version = newest_tls
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = await reader.readuntil(b" ")
                received.append(await reader.readexactly(int(length[:-1])))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def _until(received: list[bytes], count: int) -> None:
    deadline = time.monotonic() + 30
    while len(received) < count:
        assert time.monotonic() < deadline, f"{len(received)} of {count} messages arrived"
        await asyncio.sleep(0.1)


def _event(actor: str, outcome: int) -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        service="gateway",
        action=A.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome=outcome,  # type: ignore[arg-type]
        actor=actor,
        study_instance_uid="1.2.3",
        details={"purpose": "treatment"},
    )
    event.occurred_at.GetCurrentTime()
    return event


async def test_records_reach_the_repository_once_over_tls13(servers: Servers, unique: str, tmp_path: Path) -> None:
    ca, cert, key = _authority(tmp_path, "repo")
    other_ca, _, _ = _authority(tmp_path, "other")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    store = AuditStore(client, f"audit_sys_{unique}")
    try:
        await store.ensure_indexes()
        await store.append_many("c:0", [_event("dr.house", Out.AUDIT_OUTCOME_SUCCESS) for _ in range(3)])
        await store.append_many("c:1", [_event("mallory", Out.AUDIT_OUTCOME_DENIED) for _ in range(2)])

        async with _repository(cert, key) as (port, received):
            forwarder = SyslogForwarder(store, SyslogTarget("127.0.0.1", port, str(ca), "dicomsafe-audit"))
            assert await forwarder.run_once() == 5
            await _until(received, 5)
            assert await forwarder.run_once() == 0  # the position is durable: nothing twice
            await store.append("c:0", _event("dr.house", Out.AUDIT_OUTCOME_SUCCESS))
            restarted = SyslogForwarder(store, SyslogTarget("127.0.0.1", port, str(ca), "dicomsafe-audit"))
            assert await restarted.run_once() == 1
            await _until(received, 6)
            await asyncio.sleep(0.5)  # anything sent twice would have arrived by now
        assert len(received) == 6

        parsed = [MESSAGE.match(m.decode()) for m in received]
        assert all(parsed), received[0][:200]
        fields = [(int(p[1]), p[3], p[4], int(p[5])) for p in parsed if p]
        assert sorted(fields) == sorted(
            [(110, "110104", "c:0", s) for s in (1, 2, 3, 4)] + [(108, "110104", "c:1", s) for s in (1, 2)]
        )  # facility log audit (13): informational for a success, warning for a refusal
        hashes_sent = {(p[4], int(p[5])): p[6] for p in parsed if p}
        stored = {(r.chain, r.seq): r.hash for c in ("c:0", "c:1") for r in await store.records_after(c, 0, 10)}
        assert hashes_sent == stored
        for p in parsed:
            assert p is not None
            root = ET.fromstring(p[7])
            assert root.tag == "AuditMessage" and root.find("EventIdentification/EventID") is not None

        # TLS 1.2 is refused, and so is a repository whose certificate our CA did not sign.
        async with _repository(cert, key, newest_tls=ssl.TLSVersion.TLSv1_2) as (port, received):
            await store.append("c:0", _event("dr.house", Out.AUDIT_OUTCOME_SUCCESS))
            # No common version: the handshake fails (a protocol alert, or a reset, by timing).
            with pytest.raises(OSError):
                await SyslogForwarder(store, SyslogTarget("127.0.0.1", port, str(ca), "h")).run_once()
            assert received == []
        async with _repository(cert, key) as (port, received):
            with pytest.raises(ssl.SSLCertVerificationError):
                await SyslogForwarder(store, SyslogTarget("127.0.0.1", port, str(other_ca), "h")).run_once()
            assert received == []
        assert await store.forwarded_up_to("c:0") == 4  # the refused record is still to be sent
    finally:
        await client.drop_database(f"audit_sys_{unique}")
        await client.close()


async def test_the_service_forwards_what_it_records(pki: Pki, servers: Servers, unique: str, tmp_path: Path) -> None:
    ca, cert, key = _authority(tmp_path, "repo")
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    database = f"audit_sys_{unique}"
    sent = [_event("dr.house", Out.AUDIT_OUTCOME_SUCCESS) for _ in range(3)]
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    try:
        for event in sent:
            await producer.send_and_wait(topics.audit, event.SerializeToString(), key=b"dr.house")
    finally:
        await producer.stop()
    async with _repository(cert, key) as (port, received):
        cfg = with_tls(
            await audit_config(
                servers.kafka_bootstrap,
                topics.prefix,
                servers.mongodb_uri,
                database,
                syslog_target=f"127.0.0.1:{port}",
                syslog_ca_file=str(ca),
                syslog_interval_s=1,
            ),
            pki,
            "audit",
        )
        async with running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)):
            await _until(received, 3)
    parsed = [p for p in (MESSAGE.match(m.decode()) for m in received) if p]
    assert sorted(int(p[5]) for p in parsed) == [1, 2, 3]
    assert all(ET.fromstring(p[7]).tag == "AuditMessage" for p in parsed)
