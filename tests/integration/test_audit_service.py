"""The audit service on real Kafka + MongoDB: consume, chain, dead-letter garbage, answer Verify/Query."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, dlq_topic, ensure_topics, headers_for, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc, events_pb2
from services.audit.app import run
from services.authz.app import run as run_authz
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, authz_config, running, with_tls
from tools.pki import Pki


async def test_events_are_chained_and_garbage_dead_lettered(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=2))
    authz = with_tls(authz_config(servers.kafka_bootstrap, topics.prefix), pki, "authz")
    cfg = with_tls(
        await audit_config(
            servers.kafka_bootstrap,
            topics.prefix,
            servers.mongodb_uri,
            f"audit_{unique}",
            authz_target=authz.grpc_bind,
        ),
        pki,
        "audit",
    )
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    events = []
    try:
        for i in range(6):
            event = audit_pb2.AuditEvent(
                event_id=str(uuid.uuid4()),
                service="test",
                action=audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
                outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED,
                actor=f"user{i % 3}",
                study_instance_uid="1.2.840.1",
            )
            events.append(event)
            await producer.send_and_wait(topics.audit, event.SerializeToString(), key=event.actor.encode())
        # The same event again (a producer retry): must be recorded once.
        await producer.send_and_wait(topics.audit, events[0].SerializeToString(), key=events[0].actor.encode())
        garbage = events_pb2.IngestRequest(request_id="not an audit event")
        await producer.send_and_wait(topics.audit, b"\xff\x00garbage", key=b"x", headers=headers_for(garbage))
        # A well-formed AuditEvent that no BSON document can hold (NUL in a key): dead-lettered,
        # not retried forever — the sentinel behind it on the same partition must get through.
        unstorable = audit_pb2.AuditEvent()
        unstorable.CopyFrom(events[0])
        unstorable.event_id = str(uuid.uuid4())
        unstorable.details["bad\x00key"] = "x"
        await producer.send_and_wait(topics.audit, unstorable.SerializeToString(), key=unstorable.actor.encode())
        # Same key, so same partition, as the duplicate: once this is recorded, the duplicate was handled.
        sentinel = audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            service="test",
            action=audit_pb2.AuditAction.AUDIT_ACTION_AUDIT_QUERIED,
            outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            actor=events[0].actor,
            study_instance_uid="9.9.9",
        )
        await producer.send_and_wait(topics.audit, sentinel.SerializeToString(), key=sentinel.actor.encode())
    finally:
        await producer.stop()

    # authz in development mode (subject ids trusted); tokens are covered in test_audit_access.
    auditor = "aud.ito"

    async def query(**fields: object) -> list[audit_pb2.AuditRecord]:
        request = audit_pb2.QueryRequest(subject_id=auditor, **fields)  # type: ignore[arg-type]
        # Reads are audited with their filters: only the test's own events are compared here.
        return [r async for r in stub.Query(request) if r.event.service == "test"]

    async with (
        running(lambda stop: run_authz(authz, stop), authz.grpc_bind, pki.tls(TEST_CLIENT)),
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        deadline = time.monotonic() + 60
        while True:  # bounded: until every partition is through, or the deadline
            seen = [r.event for r in await query(study_instance_uid=sentinel.study_instance_uid)]
            by_study = await query(study_instance_uid="1.2.840.1", limit=100)
            if (seen and len(by_study) >= len(events)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert seen == [sentinel]
        verdict = await stub.Verify(audit_pb2.VerifyRequest(subject_id=auditor))
        by_actor = await query(actor="user1")
        (first,) = await query(actor="user0", limit=1)
        per_chain = await stub.Verify(audit_pb2.VerifyRequest(chain=first.chain, subject_id=auditor))
    assert verdict.ok
    # Reads are themselves recorded (by this service and by authz), on the same topic.
    assert verdict.records_checked >= len(events) + 1
    # One chain per partition of the topic that carried the events.
    assert verdict.chains_checked <= 2 and first.chain.startswith(f"{topics.audit}:")
    assert per_chain.ok and per_chain.chains_checked == 1 and per_chain.records_checked > 0
    assert {r.event.event_id for r in by_actor} == {e.event_id for e in events if e.actor == "user1"}
    # Stored and queried events are the produced ones, field for field; the duplicate delivery added nothing.
    assert sorted((r.event for r in by_study), key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)

    consumer = AIOKafkaConsumer(
        dlq_topic(topics.audit), bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    dead: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while len(dead) < 2 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            dead += [r for records in batch.values() for r in records]
        # Anything further would be a wrongly dead-lettered good event.
        batch = await consumer.getmany(timeout_ms=1000)
        dead += [r for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    assert len(dead) == 2
    assert all(dict(r.headers)["dlq-reason"] == b"bad_event" for r in dead)
    letters = [events_pb2.DeadLetter.FromString(r.value or b"") for r in dead]
    assert {(x.source_topic, x.reason_code, x.service) for x in letters} == {(topics.audit, "bad_event", "audit")}
    assert {x.original_value for x in letters} == {b"\xff\x00garbage", unstorable.SerializeToString()}
