"""One `dicom.ingest` record → validated → sealed by crypto → `dicom.stored` + audit events.

Raises PermanentError for input that can never be stored (the shared consume loop
dead-letters it) and TransientError when a dependency is down (the record is retried).
Every step is idempotent, so a redelivery after a crash repeats no effect.
"""

from __future__ import annotations

import hashlib
import logging

from aiokafka import AIOKafkaProducer, ConsumerRecord
from google.protobuf.message import DecodeError

from dicomsafe.common.audit_emitter import AuditEmitter, stable_event_id
from dicomsafe.common.kafka import PermanentError, Topics, TransientError, header, headers_for
from dicomsafe.v1 import audit_pb2, crypto_pb2, events_pb2
from services.ingest.sealing import Sealer, SealFailure, object_id_for
from services.ingest.validation import InvalidInstance, validate_instance

log = logging.getLogger("dicomsafe.ingest")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome


class IngestPipeline:
    def __init__(
        self, sealer: Sealer, producer: AIOKafkaProducer, audit: AuditEmitter, topics: Topics, max_instance_bytes: int
    ) -> None:
        self._sealer = sealer
        self._producer = producer
        self._audit = audit
        self._topics = topics
        self._max = max_instance_bytes

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        trace_id = header(record, "trace-id") or ""
        position = f"{record.topic}/{record.partition}/{record.offset}"
        try:
            request = events_pb2.IngestRequest.FromString(record.value or b"")
        except DecodeError:
            await self._reject("unknown-source", position, trace_id, "bad_envelope", "value is not an IngestRequest")
        source = request.source or "unknown-source"
        if request.WhichOneof("payload") != "inline_instance":
            # Reference payloads need the blob fetcher; until then they are kept, not dropped.
            await self._reject(source, position, trace_id, "unsupported_payload", "only inline instances are accepted")
        data = request.inline_instance
        try:
            facts = validate_instance(data, self._max)
        except InvalidInstance as exc:
            await self._reject(source, position, trace_id, exc.code, exc.reason)

        content_sha = hashlib.sha256(data).hexdigest()
        object_id = object_id_for(facts.sop_instance_uid, content_sha)
        metadata = crypto_pb2.SealMetadata(
            object_id=object_id,
            sop_instance_uid=facts.sop_instance_uid,
            study_instance_uid=facts.study_instance_uid,
            expected_sha256=content_sha,
            expected_size=len(data),
            patient_id=facts.patient_id,
            issuer_of_patient_id=facts.issuer_of_patient_id,
        )
        try:
            sealed = await self._sealer.seal(data, metadata)
        except SealFailure as exc:
            if exc.retryable:
                raise TransientError(f"crypto {exc.code.name}") from None
            await self._reject(
                source, position, trace_id, "seal_refused", f"crypto refused the instance ({exc.code.name})"
            )

        stored = events_pb2.StoredEvent(
            object_id=object_id,
            request_id=request.request_id,
            study_instance_uid=facts.study_instance_uid,
            series_instance_uid=facts.series_instance_uid,
            sop_instance_uid=facts.sop_instance_uid,
            sop_class_uid=facts.sop_class_uid,
            transfer_syntax_uid=facts.transfer_syntax_uid,
            plaintext_size=len(data),
            plaintext_sha256=content_sha,
            sealed_size=sealed.object.sealed_size,
            key_name=sealed.object.key_name,
            key_version=sealed.object.key_version,
            redelivery=sealed.already_stored,
        )
        stored.stored_at.GetCurrentTime()
        try:
            await self._producer.send_and_wait(
                self._topics.stored,
                stored.SerializeToString(),
                key=facts.study_instance_uid.encode(),
                headers=headers_for(stored, trace_id or None),
            )
            await self._audit.emit(
                Action.AUDIT_ACTION_INSTANCE_STORED,
                Outcome.AUDIT_OUTCOME_SUCCESS,
                source,
                study_instance_uid=facts.study_instance_uid,
                sop_instance_uid=facts.sop_instance_uid,
                object_id=object_id,
                trace_id=trace_id,
                details={
                    "sop_class_uid": facts.sop_class_uid,
                    "bytes": str(len(data)),
                    "request_id": request.request_id,
                },
                event_id=stable_event_id("stored", object_id),
            )
        except Exception as exc:  # noqa: BLE001 - broker trouble: the record stays uncommitted
            raise TransientError(f"publishing stored event failed ({type(exc).__name__})") from None
        log.info(
            "instance stored",
            extra={"object_id": object_id, "bytes": len(data), "redelivery": sealed.already_stored, "at": position},
        )

    async def _reject(self, source: str, position: str, trace_id: str, code: str, reason: str) -> None:
        try:
            await self._audit.emit(
                Action.AUDIT_ACTION_INSTANCE_REJECTED,
                Outcome.AUDIT_OUTCOME_FAILURE,
                source,
                reason=f"{code}: {reason}",
                trace_id=trace_id,
                details={"source_record": position},
                event_id=stable_event_id("rejected", position),
            )
        except Exception as exc:  # noqa: BLE001
            raise TransientError(f"audit unavailable ({type(exc).__name__})") from None
        raise PermanentError(code, reason)
