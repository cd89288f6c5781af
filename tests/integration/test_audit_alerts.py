"""Pattern alerts from the running audit service on real Kafka + MongoDB: raised with their
evidence, and not raised again for the same evidence after a restart."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.v1 import alerts_pb2, audit_pb2
from services.audit.app import run
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, running, with_tls
from tools.pki import Pki

A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
SECOND = dt.timedelta(seconds=1)


async def _publish(producer: AIOKafkaProducer, topic: str, event: audit_pb2.AuditEvent) -> audit_pb2.AuditEvent:
    await producer.send_and_wait(topic, event.SerializeToString(), key=event.actor.encode())
    return event


def _event(action: int, outcome: int, actor: str, at: dt.datetime, reason: str = "") -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        service="test",
        action=action,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        actor=actor,
        reason=reason,
    )
    event.occurred_at.FromDatetime(at)
    return event


async def _alerts_until(
    consumer: AIOKafkaConsumer, seen: list[alerts_pb2.SecurityAlert], evidence: str, timeout_s: float = 60
) -> None:
    """Collect alerts until one carries this evidence (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not any(evidence in a.evidence_event_ids for a in seen):
        assert time.monotonic() < deadline, "alert never raised"
        batch = await consumer.getmany(timeout_ms=500)
        seen += [alerts_pb2.SecurityAlert.FromString(r.value or b"") for rs in batch.values() for r in rs]


async def test_alerts_carry_their_evidence_and_survive_a_restart_once(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=2))
    database = f"audit_al_{unique}"
    cfg = with_tls(
        await audit_config(
            servers.kafka_bootstrap,
            topics.prefix,
            servers.mongodb_uri,
            database,
            alert_interval_s=1,
        ),
        pki,
        "audit",
    )
    now = dt.datetime.now(dt.UTC)
    producer = new_producer(servers.kafka_bootstrap, "test")
    consumer = AIOKafkaConsumer(topics.alerts, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    try:
        burst = [
            await _publish(
                producer,
                topics.audit,
                _event(
                    A.AUDIT_ACTION_ACCESS_DECISION, Out.AUDIT_OUTCOME_DENIED, "mallory", now - dt.timedelta(seconds=i)
                ),
            )
            for i in range(6)
        ]
        # Below the threshold (5 in 10 min): no alert for this one.
        for i in range(2):
            at = now - dt.timedelta(seconds=i)
            await _publish(
                producer, topics.audit, _event(A.AUDIT_ACTION_ACCESS_DECISION, Out.AUDIT_OUTCOME_DENIED, "dr.typo", at)
            )
        override = await _publish(
            producer,
            topics.audit,
            _event(A.AUDIT_ACTION_EMERGENCY_OVERRIDE, Out.AUDIT_OUTCOME_SUCCESS, "dr.er", now, "cardiac arrest"),
        )
        first: list[alerts_pb2.SecurityAlert] = []
        async with running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)):
            await _alerts_until(consumer, first, override.event_id)
            await _alerts_until(consumer, first, burst[0].event_id)

        # Restarted: the same evidence is in the window again, but nothing is re-raised; new
        # evidence is. Two sentinels in turn: when the second arrives, the run that raised the
        # first (and looked at every old finding too) is complete.
        again: list[alerts_pb2.SecurityAlert] = []
        async with running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)):
            sentinels = []
            for reason in ("stroke", "trauma"):
                sentinels.append(
                    await _publish(
                        producer,
                        topics.audit,
                        _event(A.AUDIT_ACTION_EMERGENCY_OVERRIDE, Out.AUDIT_OUTCOME_SUCCESS, "dr.er", now, reason),
                    )
                )
                await _alerts_until(consumer, again, sentinels[-1].event_id)
    finally:
        await consumer.stop()
        await producer.stop()

    by_rule = {a.rule: a for a in first}
    assert sorted(a.rule for a in first) == ["break_glass", "denial_burst"]
    glass, denials = by_rule["break_glass"], by_rule["denial_burst"]
    assert list(glass.evidence_event_ids) == [override.event_id]
    assert (list(glass.subjects), glass.severity, glass.source) == (["dr.er"], "info", "audit")
    assert "cardiac arrest" in glass.summary
    assert sorted(denials.evidence_event_ids) == sorted(e.event_id for e in burst)
    assert (list(denials.subjects), denials.severity) == (["mallory"], "warning")
    assert "6 refusals within 10 min (threshold 5)" in denials.summary
    assert len({a.alert_id for a in first}) == 2
    # After the restart: exactly the two new overrides, each once.
    assert [list(a.evidence_event_ids) for a in again] == [[s.event_id] for s in sentinels]
    assert not {a.alert_id for a in again} & {a.alert_id for a in first}
