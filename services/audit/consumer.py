"""From `audit.events` records to chain appends; one chain per partition.

A partition has a single consumer in the group, so appending in partition order keeps each
chain's sequence; a zombie consumer after a rebalance loses the race on the unique
(chain, seq) index instead of forking the chain.
"""

from __future__ import annotations

import logging

from aiokafka import ConsumerRecord

from dicomsafe.common.kafka import PermanentError, decode_value
from dicomsafe.common.metrics import DURATION
from dicomsafe.v1 import audit_pb2
from services.audit.store import AuditStore

log = logging.getLogger("dicomsafe.audit")


def chain_of(record: ConsumerRecord[bytes, bytes]) -> str:
    return f"{record.topic}:{record.partition}"


class AuditConsumer:
    def __init__(self, store: AuditStore) -> None:
        self._store = store

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        seq = await self._store.append(chain_of(record), decode_event(record))
        if seq is None:
            log.info("duplicate audit event skipped", extra={"offset": record.offset, "partition": record.partition})

    async def handle_batch(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """One partition's records → one chained bulk insert (the fast path)."""
        events = [decode_event(r) for r in records]
        with DURATION.labels("audit", "append").time():
            await self._store.append_many(chain_of(records[0]), events)


def decode_event(record: ConsumerRecord[bytes, bytes]) -> audit_pb2.AuditEvent:
    event = decode_value(record, audit_pb2.AuditEvent, "bad_event")
    if not event.event_id:
        raise PermanentError("bad_event", "audit event without event_id")
    if event.action == audit_pb2.AuditAction.AUDIT_ACTION_UNSPECIFIED:
        raise PermanentError("bad_event", "audit event without action")
    return event
