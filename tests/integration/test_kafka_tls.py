"""Kafka clients over TLS 1.3 (KAFKA_SECURITY_PROTOCOL=SSL) against the local broker's SSL
listener (tools.infra: PEM keystore, client certificates required, TLS 1.3 only)."""

from __future__ import annotations

import socket
import ssl
import uuid

import pytest

from dicomsafe.common.kafka import Topics, TopicSpec, ensure_topics, new_consumer, new_producer
from tests.servers import Servers
from tools import infra
from tools.pki import Pki


@pytest.fixture
def broker_pki(servers: Servers) -> Pki:
    if servers.origin.get("kafka") != "local":
        pytest.skip("the SSL listener is the local Kafka's (tools.infra); this Kafka came from env/testcontainers")
    pki = Pki(infra.kafka_tls_dir())
    assert pki.ca_file.exists(), "the local Kafka runs without its SSL listener: restart it (make infra-down)"
    return pki


def _handshake(tls_version: ssl.TLSVersion, pki: Pki, with_certificate: bool) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = tls_version
    ctx.load_verify_locations(cafile=pki.ca_file)
    if with_certificate:
        client = pki.tls("kafka-test-client")
        ctx.load_cert_chain(client.cert_file, client.key_file)
    raw = socket.create_connection(("127.0.0.1", infra.KAFKA_TLS_PORT), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        # TLS 1.3 finishes the client's side first: a refused client certificate shows on the
        # next read, as an alert or a closed connection.
        conn.sendall(b"\0\0\0\0")
        if conn.recv(1) == b"" and not with_certificate:
            raise ssl.SSLError("closed")
        return str(conn.version())


async def test_clients_produce_and_consume_over_tls13(
    broker_pki: Pki, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = broker_pki.issue("kafka-test-client")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("TLS_CERT_FILE", str(client.cert_file))
    monkeypatch.setenv("TLS_KEY_FILE", str(client.key_file))
    # The services' own CA for gRPC; the brokers have theirs (as with Strimzi's cluster CA).
    monkeypatch.setenv("TLS_CA_FILE", str(pki.ca_file))
    monkeypatch.setenv("KAFKA_SSL_CA_FILE", str(broker_pki.ca_file))
    bootstrap = f"127.0.0.1:{infra.KAFKA_TLS_PORT}"
    topic = Topics(f"tls{uuid.uuid4().hex[:8]}.").audit
    await ensure_topics(bootstrap, [TopicSpec(topic, 1, {})])
    producer = new_producer(bootstrap, "tls-test")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over tls", key=b"k")
    finally:
        await producer.stop()
    consumer = new_consumer(bootstrap, f"tls-test-{uuid.uuid4().hex[:6]}", [topic], "tls-test")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=20000)
    finally:
        await consumer.stop()
    assert [r.value for records in batch.values() for r in records] == [b"over tls"]


def test_the_ssl_listener_refuses_tls12_and_clients_without_a_certificate(broker_pki: Pki) -> None:
    broker_pki.issue("kafka-test-client")
    assert _handshake(ssl.TLSVersion.TLSv1_3, broker_pki, with_certificate=True) == "TLSv1.3"
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        _handshake(ssl.TLSVersion.TLSv1_2, broker_pki, with_certificate=True)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _handshake(ssl.TLSVersion.TLSv1_3, broker_pki, with_certificate=False)
