"""The audit service killed with SIGKILL mid-stream and restarted: no gap, no duplicate."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2
from services.audit.store import Verdict
from tests.audit_trail import verify_directly
from tests.servers import Servers
from tools.stack import Stack, StackSettings, free_base_port

EVENTS = 3000


async def test_sigkill_mid_stream_loses_and_duplicates_nothing(servers: Servers, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    topics = Topics(f"kill{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=3))
    stack = Stack(
        StackSettings(
            kafka_bootstrap=servers.kafka_bootstrap,
            vault_addr=servers.vault_addr,
            mongodb_uri=servers.mongodb_uri,
            vault_admin_token=servers.vault_token,
            work_dir=tmp_path,
            topic_prefix=topics.prefix,
            base_port=free_base_port(),
            audit_db=f"kill_audit_{unique}",
        )
    )
    database = stack.settings.audit_db

    async def _verify() -> Verdict:
        return await verify_directly(servers.mongodb_uri, database)

    producer = new_producer(servers.kafka_bootstrap, "kill-test")
    await producer.start()
    try:
        await asyncio.to_thread(stack.start, ("audit",))
        for i in range(EVENTS):
            event = audit_pb2.AuditEvent(
                event_id=str(uuid.uuid4()),
                service="test",
                action=audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
                outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
                actor=f"user{i % 7}",
            )
            await producer.send(topics.audit, event.SerializeToString(), key=event.actor.encode())
        await producer.flush()

        deadline = time.monotonic() + 120
        while (at_kill := (await _verify()).records) < EVENTS // 3:
            assert time.monotonic() < deadline, "audit service made no progress"
            await asyncio.sleep(0.1)
        stack.processes["audit"].send_signal(signal.SIGKILL)  # mid-stream, no chance to clean up
        stack.processes["audit"].wait(timeout=30)
        stack.processes.pop("audit")
        await asyncio.to_thread(stack.start, ("audit",))

        verdict = await _verify()
        while verdict.records < EVENTS and time.monotonic() < deadline + 120:
            await asyncio.sleep(0.5)
            verdict = await _verify()
        await asyncio.sleep(2)  # anything recorded twice would show up now
        verdict = await _verify()
    finally:
        await producer.stop()
        stack.stop()
    assert at_kill < EVENTS, "the kill must land mid-stream"
    assert verdict.ok, list(verdict.breaks)
    assert verdict.records == EVENTS  # no gap, no duplicate
