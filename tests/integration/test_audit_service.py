"""The audit service on real Kafka + MongoDB: consume, chain, dead-letter garbage, answer Verify/Query."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from aiokafka import AIOKafkaConsumer

from dicomsafe.common.kafka import Topics, dlq_topic, ensure_topics, headers_for, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc, events_pb2
from services.audit.app import run
from services.audit.config import AuditConfig
from services.audit.provision import provision, writer_uri
from tests.servers import Servers
from tests.service_runner import free_port, running


async def test_events_are_chained_and_garbage_dead_lettered(servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=2))
    user, password = await provision(servers.mongodb_uri, f"audit_{unique}")
    cfg = AuditConfig(
        grpc_bind=f"127.0.0.1:{free_port()}",
        kafka_bootstrap=servers.kafka_bootstrap,
        topic_prefix=topics.prefix,
        group_id=f"audit-{unique}",
        # The service runs as the insert/find-only writer, as in production.
        mongodb_uri=writer_uri(servers.mongodb_uri, f"audit_{unique}", user, password),
        database=f"audit_{unique}",
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
    finally:
        await producer.stop()

    async with running(lambda stop: run(cfg, stop), cfg.grpc_bind), grpc.aio.insecure_channel(cfg.grpc_bind) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        deadline = time.monotonic() + 60
        verdict = await stub.Verify(audit_pb2.VerifyRequest())
        while verdict.records_checked < len(events) and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            verdict = await stub.Verify(audit_pb2.VerifyRequest())
        await asyncio.sleep(1)  # let a wrongly recorded duplicate show up, if there were one
        verdict = await stub.Verify(audit_pb2.VerifyRequest())
        by_actor = [r async for r in stub.Query(audit_pb2.QueryRequest(actor="user1"))]
    assert verdict.ok
    assert verdict.records_checked == len(events)
    assert {r.event.event_id for r in by_actor} == {e.event_id for e in events if e.actor == "user1"}

    consumer = AIOKafkaConsumer(
        dlq_topic(topics.audit), bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
    finally:
        await consumer.stop()
    dead = [r for records in batch.values() for r in records]
    assert len(dead) == 1
    assert dict(dead[0].headers)["dlq-reason"] == b"bad_event"
