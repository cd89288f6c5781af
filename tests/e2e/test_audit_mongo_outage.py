"""MongoDB stopped for a while under load: the audit consumer stops committing, events wait in
Kafka, and after recovery every event is recorded once — no gap, no duplicate.

Uses a MongoDB-wire server of its own (SecantusDB, persistent storage) so it can be stopped
with SIGTERM and started again on the same data.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from pymongo.errors import PyMongoError

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2
from services.audit.store import Verdict
from tests.audit_trail import verify_directly
from tests.restartable import OwnMongo
from tests.servers import Servers
from tools.stack import Stack, StackSettings, free_base_port

EVENTS = 1500


async def _records(mongodb_uri: str, database: str) -> Verdict | None:
    try:
        return await verify_directly(mongodb_uri, database)
    except PyMongoError:
        return None  # MongoDB down


async def test_mongodb_outage_under_load_loses_nothing(servers: Servers, own_mongo: OwnMongo, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    topics = Topics(f"mout{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=2))
    stack = Stack(
        StackSettings(
            kafka_bootstrap=servers.kafka_bootstrap,
            vault_addr=servers.vault_addr,
            vault_admin_token=servers.vault_token,
            mongodb_uri=own_mongo.uri,
            work_dir=tmp_path / "stack",
            topic_prefix=topics.prefix,
            base_port=free_base_port(),
            audit_db=f"mout_{unique}",
        )
    )
    # Only the audit service runs here; its port is derived from base_port.
    stack.settings.work_dir.mkdir()
    producer = new_producer(servers.kafka_bootstrap, "outage-load")
    await producer.start()

    async def publish(n: int) -> None:
        for i in range(n):
            event = audit_pb2.AuditEvent(
                event_id=str(uuid.uuid4()),
                service="test",
                action=audit_pb2.AuditAction.AUDIT_ACTION_OBJECT_OPENED,
                outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
                actor=f"user{i % 11}",
            )
            await producer.send(topics.audit, event.SerializeToString(), key=event.actor.encode())
        await producer.flush()

    try:
        await asyncio.to_thread(stack.start, ("audit",))
        await publish(EVENTS // 3)
        own_mongo.stop()  # down while events keep coming
        await publish(EVENTS - EVENTS // 3)
        await asyncio.sleep(5)
        assert await _records(own_mongo.uri, stack.settings.audit_db) is None
        assert stack.processes["audit"].poll() is None, "the service must wait, not crash"
        own_mongo.start()
        deadline = time.monotonic() + 180
        verdict = await _records(own_mongo.uri, stack.settings.audit_db)
        while (verdict is None or verdict.records < EVENTS) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            verdict = await _records(own_mongo.uri, stack.settings.audit_db)
        await asyncio.sleep(2)
        verdict = await _records(own_mongo.uri, stack.settings.audit_db)
    finally:
        await producer.stop()
        stack.stop()
    assert verdict is not None and verdict.ok, verdict
    assert verdict.records == EVENTS
