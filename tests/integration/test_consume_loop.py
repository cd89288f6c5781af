"""The shared consume loop on real Kafka: commit after effect, retry on outage, dead-letter on bad input."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from dicomsafe.common.kafka import (
    BatchHandler,
    DeadLetterPublisher,
    Handler,
    PermanentError,
    RetryPolicy,
    TopicSpec,
    TransientError,
    consume_forever,
    dlq_topic,
    ensure_topics,
    new_consumer,
    new_producer,
)
from dicomsafe.v1 import events_pb2
from tests.servers import Servers

log = logging.getLogger("test")
FAST = RetryPolicy(first_delay_s=0.05, max_delay_s=0.2, max_unexpected_attempts=3)


async def _setup(servers: Servers, topic: str) -> None:
    await ensure_topics(servers.kafka_bootstrap, [TopicSpec(topic, 1), TopicSpec(dlq_topic(topic), 1)])
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"r{i}".encode(), key=b"k")
    finally:
        await producer.stop()


async def _run_until(
    servers: Servers,
    topic: str,
    group: str,
    handle: Handler,
    done: asyncio.Event,
    handle_batch: BatchHandler | None = None,
) -> None:
    consumer = new_consumer(servers.kafka_bootstrap, group, [topic], "test")
    producer = new_producer(servers.kafka_bootstrap, "test-dlq")
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    dlq = DeadLetterPublisher(producer, "test")
    task = asyncio.create_task(consume_forever(consumer, handle, dlq, stop, log, FAST, handle_batch=handle_batch))
    try:
        await asyncio.wait_for(done.wait(), timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        await consumer.stop()
        await producer.stop()


async def _committed(servers: Servers, topic: str, group: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=servers.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await consumer.stop()


async def _dead_letters(servers: Servers, topic: str) -> list[events_pb2.DeadLetter]:
    consumer = AIOKafkaConsumer(
        dlq_topic(topic), bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=3000)
        return [events_pb2.DeadLetter.FromString(r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()


async def test_outage_is_retried_in_order_and_bad_input_dead_lettered(servers: Servers, unique: str) -> None:
    topic, group = f"loop{unique}", f"g{unique}"
    await _setup(servers, topic)
    seen: list[str] = []
    outage = {"left": 3}
    done = asyncio.Event()

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        value = record.value.decode()
        if value == "r1" and outage["left"]:
            outage["left"] -= 1
            raise TransientError("dependency down")
        if value == "r3":
            raise PermanentError("bad_input", "r3 is malformed")
        seen.append(value)
        if value == "r4":
            done.set()

    await _run_until(servers, topic, group, handle, done)
    assert seen == ["r0", "r1", "r2", "r4"]  # in order; r1 retried until the outage ended
    assert outage["left"] == 0
    assert await _committed(servers, topic, group) == 5
    letters = await _dead_letters(servers, topic)
    assert [(d.reason_code, d.original_value, d.source_offset) for d in letters] == [("bad_input", b"r3", 3)]


async def test_poison_record_is_dead_lettered_after_bounded_retries(servers: Servers, unique: str) -> None:
    topic, group = f"poison{unique}", f"g{unique}"
    await _setup(servers, topic)
    attempts: dict[str, int] = {}
    done = asyncio.Event()

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        value = record.value.decode()
        attempts[value] = attempts.get(value, 0) + 1
        if value == "r2":
            raise ZeroDivisionError("a bug")
        if value == "r4":
            done.set()

    await _run_until(servers, topic, group, handle, done)
    assert attempts["r2"] == FAST.max_unexpected_attempts
    letters = await _dead_letters(servers, topic)
    assert [(d.reason_code, d.reason) for d in letters] == [("unexpected_error", "ZeroDivisionError")]


async def test_stop_before_success_leaves_the_offset_uncommitted(servers: Servers, unique: str) -> None:
    topic, group = f"nocommit{unique}", f"g{unique}"
    await _setup(servers, topic)
    done = asyncio.Event()
    calls = 0

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        nonlocal calls
        calls += 1
        if record.value == b"r0":
            done.set()
            raise TransientError("still down when we stop")

    await _run_until(servers, topic, group, handle, done)
    assert calls >= 1
    assert await _committed(servers, topic, group) is None  # nothing acknowledged, nothing lost


async def test_records_before_an_outage_are_committed_once_not_redone(servers: Servers, unique: str) -> None:
    # Offsets are committed once per fetched batch; a record that fails transiently must not
    # hold back the commit of the ones handled before it.
    topic, group = f"partial{unique}", f"g{unique}"
    await _setup(servers, topic)
    done = asyncio.Event()
    handled: list[str] = []

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value == b"r2":
            done.set()
            raise TransientError("down from r2 on")
        handled.append(record.value.decode())

    await _run_until(servers, topic, group, handle, done)
    assert handled == ["r0", "r1"]
    assert await _committed(servers, topic, group) == 2


async def test_failed_batch_is_redone_record_by_record(servers: Servers, unique: str) -> None:
    topic, group = f"batch{unique}", f"g{unique}"
    await _setup(servers, topic)
    batches: list[list[str]] = []
    singles: list[str] = []
    done = asyncio.Event()

    async def handle_batch(records: list[ConsumerRecord[bytes, bytes]]) -> None:
        values = [r.value.decode() for r in records]
        batches.append(values)
        if "r3" in values:
            raise PermanentError("bad_input", "r3 is malformed")

    async def handle(record: ConsumerRecord[bytes, bytes]) -> None:
        value = record.value.decode()
        if value == "r3":
            raise PermanentError("bad_input", "r3 is malformed")
        singles.append(value)
        if value == "r4":
            done.set()

    await _run_until(servers, topic, group, handle, done, handle_batch)
    # However Kafka split the records into batches, every good record was processed once —
    # in a batch that succeeded or one by one after its batch failed — and only r3 was rejected.
    good_batches = [v for b in batches if "r3" not in b for v in b]
    assert sorted(good_batches + singles) == ["r0", "r1", "r2", "r4"]
    for failed in (b for b in batches if "r3" in b):
        assert [s for s in singles if s in failed] == [v for v in failed if v != "r3"]
    assert await _committed(servers, topic, group) == 5
    assert [d.source_offset for d in await _dead_letters(servers, topic)] == [3]
