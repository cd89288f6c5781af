"""IngestService.Store: the synchronous way in for DICOMweb STOW-RS, on the same pipeline as Kafka."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from dicomsafe.common.kafka import TransientError
from dicomsafe.v1 import ingest_pb2, ingest_pb2_grpc
from services.ingest.pipeline import DUPLICATE, IngestPipeline, Refused, StoreContext

log = logging.getLogger("dicomsafe.ingest")

SERVICE_NAME = "dicomsafe.v1.IngestService"


class StoreServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, pipeline: IngestPipeline, max_bytes: int) -> None:
        self._pipeline = pipeline
        self._max = max_bytes

    async def Store(
        self,
        request_iterator: AsyncIterator[ingest_pb2.StoreRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> ingest_pb2.StoreResponse:
        limit = self._max
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad_request: the first message must carry metadata")
        meta = first.metadata
        if meta.size > limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"oversized: limit is {limit} bytes")
        # Held whole because validation parses the complete file; bounded by the limit above
        # (INGEST_STORE_MAX_BYTES), which sizes the ingest pod's memory.
        data = bytearray()
        async for part in request_iterator:
            if part.WhichOneof("part") != "data":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad_request: metadata sent twice")
            data += part.data
            if len(data) > limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"oversized: limit is {limit} bytes")
        if meta.size and meta.size != len(data):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "truncated: fewer bytes than declared")
        source = meta.source or "unknown-source"
        ctx = StoreContext(
            source=source,
            request_id=meta.request_id,
            trace_id=meta.trace_id,
            actor=meta.on_behalf_of or source,
            position=f"{source}/{meta.request_id}",
        )
        try:
            stored = await self._pipeline.store(bytes(data), ctx, limit)
        except Refused as exc:
            try:
                await self._pipeline.record_refusal(ctx, exc)
            except TransientError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "audit unavailable, retry later")
            # ALREADY_EXISTS tells the caller apart an instance refused for its UID (PS3.4 0111H).
            status = grpc.StatusCode.ALREADY_EXISTS if exc.code == DUPLICATE else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(status, f"{exc.code}: {exc.reason}")
        except TransientError as exc:
            log.warning("store deferred", extra={"request_id": meta.request_id, "reason": str(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"retry later ({exc})")
        event = stored.event
        return ingest_pb2.StoreResponse(
            object_id=event.object_id,
            study_instance_uid=event.study_instance_uid,
            series_instance_uid=event.series_instance_uid,
            sop_instance_uid=event.sop_instance_uid,
            sop_class_uid=event.sop_class_uid,
            transfer_syntax_uid=event.transfer_syntax_uid,
            size=event.plaintext_size,
            sha256=event.plaintext_sha256,
            already_stored=event.redelivery,
            patient_ref=stored.patient_ref,
            warnings=list(event.warnings),
        )
