"""Keeps the QIDO index in sync with `dicom.stored`, whatever way an instance came in.

The stored event carries no PHI, so the indexer reads the instance back through crypto under
its own service identity and keeps only the index attributes. Offsets are committed after the
index write; re-indexing is an idempotent upsert.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

import grpc
from aiokafka import ConsumerRecord
from pydicom.errors import InvalidDicomError

from dicomsafe.common.kafka import PermanentError, TransientError, decode_value
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc, events_pb2
from services.gateway.index_entry import IndexEntry, entry_for
from services.gateway.instance_layout import InstanceLayout, LayoutError, layout_of, read_header
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway.indexer")
INDEXER_IDENTITY = "svc-gateway-indexer"
DEFAULT_GRACE_S = 2.0
# Read-backs in flight at once within a batch: each waits mostly on crypto's Vault unwrap, so
# one at a time left the indexer at ~8 instances/s, minutes behind ingest after any backlog.
DEFAULT_READ_CONCURRENCY = 8


class Indexer:
    def __init__(
        self,
        crypto: crypto_pb2_grpc.CryptoServiceAsyncStub,
        index: StudyIndex,
        deadline_s: float,
        grace_s: float = DEFAULT_GRACE_S,
        read_concurrency: int = DEFAULT_READ_CONCURRENCY,
    ) -> None:
        self._crypto = crypto
        self._index = index
        self._deadline = deadline_s
        self._grace = grace_s
        self._reads = asyncio.Semaphore(max(1, read_concurrency))

    async def _settle(self, newest: ConsumerRecord[bytes, bytes]) -> None:
        """Let a fresh event age ``grace_s`` first: a STOW-RS request indexes its instances just
        after ingest announces them, and an event handled in between costs a needless read back
        through crypto. Waits at most ``grace_s`` (a producer clock running ahead cannot stall it)."""
        age = time.time() - newest.timestamp / 1000
        if age < self._grace:
            await asyncio.sleep(min(self._grace - age, self._grace))

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        event = _stored_event(record)
        await self._settle(record)
        if _key(event) not in await self._indexed([event]):
            entry = await self._entry_from_crypto(event)
            if entry is not None:
                await self._add([entry])

    async def handle_batch(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        """A partition's events with one index read for all (a STOW-RS request's instances are
        mostly indexed already), the rest read back concurrently and indexed in one bulk write.
        A bad record fails the batch, which the loop then redoes record by record (handle); each
        is idempotent, so redoing the ones before it changes nothing."""
        events = [_stored_event(record) for record in records]
        await self._settle(records[-1])
        indexed = await self._indexed(events)
        missing = {_key(e): e for e in events if _key(e) not in indexed}
        # Every read finishes (none is left running behind a failure); then the first failure
        # fails the batch, before anything of it is written.
        results = await asyncio.gather(*(self._entry_from_crypto(e) for e in missing.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        await self._add([r for r in results if isinstance(r, IndexEntry)])

    async def _add(self, entries: list[IndexEntry]) -> None:
        try:
            await self._index.add_many(entries)
        except Exception as exc:  # noqa: BLE001 - MongoDB down: keep the offset, retry
            raise TransientError(f"index write failed ({type(exc).__name__})") from None

    async def _indexed(self, events: list[events_pb2.StoredEvent]) -> set[tuple[str, str]]:
        try:
            # Indexed by their STOW-RS request: reading them back through crypto would only cost.
            return await self._index.indexed([_key(e) for e in events])
        except Exception as exc:  # noqa: BLE001 - MongoDB down: keep the offset, retry
            raise TransientError(f"index read failed ({type(exc).__name__})") from None

    async def _entry_from_crypto(self, event: events_pb2.StoredEvent) -> IndexEntry | None:
        """The index entry of a stored instance read back through crypto; None when there is
        nothing to index (the object is gone or was crypto-shredded meanwhile)."""
        async with self._reads:
            return await self._read_entry(event)

    async def _read_entry(self, event: events_pb2.StoredEvent) -> IndexEntry | None:
        try:
            description = await self._crypto.Describe(
                crypto_pb2.DescribeRequest(object_id=event.object_id), timeout=self._deadline
            )
            stream = self._crypto.Open(
                crypto_pb2.OpenRequest(object_id=event.object_id, on_behalf_of=INDEXER_IDENTITY),
                timeout=self._deadline,
            )
            data = b"".join([piece.data async for piece in stream])
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                log.info("stored object gone", extra={"object_id": event.object_id})
                return None
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # Crypto-shredded before this event was reached: indexing it would bring the erased
                # patient's names back (the erasure event may already have been handled).
                log.info("stored object erased", extra={"object_id": event.object_id})
                return None
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                # Fails authentication (altered, or sealed under a key destroyed meanwhile): no retry
                # will read it, and retrying would hold up the partition. Dead-lettered, kept.
                raise PermanentError("unreadable_object", "crypto cannot authenticate the sealed object") from None
            raise TransientError(f"crypto {exc.code().name}") from None
        try:
            ds, layout = layout_of(data)
        except LayoutError:
            ds, _ = read_header(data)
            layout = InstanceLayout(0, None, (), False)
        except (InvalidDicomError, EOFError, ValueError) as exc:
            raise PermanentError("unparseable", f"stored instance unreadable ({type(exc).__name__})") from None
        stored_at = event.stored_at.ToDatetime(dt.UTC) if event.HasField("stored_at") else None
        return entry_for(ds, layout, event.object_id, len(data), description.erasure_key_ref, stored_at)


def _stored_event(record: ConsumerRecord[bytes, bytes]) -> events_pb2.StoredEvent:
    event = decode_value(record, events_pb2.StoredEvent, "bad_envelope")
    if not event.object_id:
        raise PermanentError("bad_envelope", "stored event without object id")
    return event


def _key(event: events_pb2.StoredEvent) -> tuple[str, str]:
    return event.sop_instance_uid, event.object_id
