"""Reading a whole topic, up to the end offsets it has now, for exact counts in tests."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer


async def read_to_end(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[bytes]:
    """Every record value on ``topic`` (all partitions), in partition order.

    Callers first make sure the writes they expect were acknowledged; the end offsets taken
    here then include them, so a count is exact rather than "at least".
    """
    # Without a group the consumer is assigned every partition of the topic once started.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = sorted(consumer.assignment())
        if not partitions:
            raise RuntimeError(f"topic {topic} has no partitions")
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        values: list[bytes] = []

        async def behind() -> bool:
            for tp, end in ends.items():
                if await consumer.position(tp) < end:
                    return True
            return False

        async def drain() -> None:
            while await behind():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value or b"" for r in records)

        await asyncio.wait_for(drain(), timeout=timeout_s)
        return values
    finally:
        await consumer.stop()
