"""A `dicom.ingest` record → the shared store path (dicomsafe.storage.instance_storer).

What is Kafka's here: decoding the envelope, and turning a refusal into a dead-lettered record
(with its audit event) rather than an exception the consume loop would retry forever.
"""

from __future__ import annotations

from aiokafka import ConsumerRecord
from google.protobuf.message import DecodeError

from dicomsafe.common.kafka import PermanentError, header
from dicomsafe.storage.instance_storer import InstanceStorer, Refused, StoreContext
from dicomsafe.v1 import events_pb2


class IngestPipeline:
    def __init__(self, storer: InstanceStorer) -> None:
        self._storer = storer

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        trace_id = header(record, "trace-id") or ""
        position = f"{record.topic}/{record.partition}/{record.offset}"
        try:
            request = events_pb2.IngestRequest.FromString(record.value or b"")
        except DecodeError:
            request = None
        source = (request.source if request else "") or "unknown-source"
        ctx = StoreContext(source, request.request_id if request else "", trace_id, source, position)
        try:
            if request is None:
                raise Refused("bad_envelope", "value is not an IngestRequest")
            if request.WhichOneof("payload") != "inline_instance":
                # Reference payloads need the blob fetcher; until then they are kept, not dropped.
                raise Refused("unsupported_payload", "only inline instances are accepted")
            await self._storer.store(request.inline_instance, ctx)
        except Refused as exc:
            await self._storer.record_refusal(ctx, exc)
            raise PermanentError(exc.code, exc.reason) from None
