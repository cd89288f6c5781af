"""One instance → validated → sealed (key from crypto, bytes sealed here) → `dicom.stored` + audit.

Every way in shares it: a `dicom.ingest` record (ingest's consumer) and a STOW-RS part (the
gateway, which holds the bytes and seals them itself rather than streaming them on). Input that
can never be stored raises Refused (the Kafka path dead-letters it, STOW-RS reports it per
instance); a dependency being down raises TransientError (the record or the request is retried).
Every step is idempotent, so a redelivery after a crash repeats no effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import grpc
from aiokafka import AIOKafkaProducer

from dicomsafe.common.audit_emitter import AuditEmitter, stable_event_id
from dicomsafe.common.kafka import Topics, TransientError, headers_for
from dicomsafe.dicom.validation import InstanceFacts, InvalidInstance, ParsedInstance, check_instance, validate_instance
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.storage.sealer import Sealer, SealFailure
from dicomsafe.v1 import audit_pb2, crypto_pb2, events_pb2

log = logging.getLogger("dicomsafe.store")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome


DUPLICATE = "duplicate_sop_instance"


@dataclass(frozen=True)
class Refused(Exception):
    """The instance can never be stored; code and reason are free of DICOM values (no PHI)."""

    code: str
    reason: str


@dataclass(frozen=True)
class StoreContext:
    source: str
    request_id: str
    trace_id: str
    # The audit actor: the publishing system, or the verified user behind a STOW-RS request.
    actor: str
    # Where the instance came from, for the rejection audit event (topic/partition/offset or request).
    position: str


@dataclass(frozen=True)
class StoredInstance:
    event: events_pb2.StoredEvent
    patient_ref: str
    facts: InstanceFacts


class InstanceStorer:
    def __init__(
        self, sealer: Sealer, producer: AIOKafkaProducer, audit: AuditEmitter, topics: Topics, max_instance_bytes: int
    ) -> None:
        self._sealer = sealer
        self._producer = producer
        self._audit = audit
        self._topics = topics
        self._max = max_instance_bytes

    async def store(
        self, data: bytes, ctx: StoreContext, max_bytes: int | None = None, parsed: ParsedInstance | None = None
    ) -> StoredInstance:
        """Validate, seal and announce one instance. Raises Refused or TransientError.

        ``max_bytes`` overrides the Kafka record limit for callers that stream the instance
        (STOW-RS): the broker's message size then does not bound what a study can hold.
        ``parsed`` is ``data`` already parsed (parse_instance) by a caller that needed its
        attributes first: parsing is the costliest step of validation, done once.
        """
        try:
            if parsed is None:
                facts = validate_instance(data, max_bytes or self._max)
            else:
                if parsed.size != len(data):
                    raise ValueError("parsed is not the parse of data")
                facts = check_instance(parsed)
        except InvalidInstance as exc:
            raise Refused(exc.code, exc.reason) from None

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
            sealed = await self._sealer.seal(data, metadata, sha256_of_data=content_sha)
        except SealFailure as exc:
            if exc.retryable:
                raise TransientError(f"crypto {exc.code.name}") from None
            if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                # First stored wins: the archive keeps what it acknowledged, the newcomer is kept
                # in the dead-letter topic (Kafka) or refused to its sender (STOW-RS), never lost.
                raise Refused(DUPLICATE, "an instance with this SOP Instance UID and other content is stored") from None
            raise Refused("seal_refused", f"crypto refused the instance ({exc.code.name})") from None

        stored = events_pb2.StoredEvent(
            object_id=object_id,
            request_id=ctx.request_id,
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
            warnings=facts.warnings,
        )
        stored.stored_at.GetCurrentTime()
        try:
            # Both must be on the broker before the instance counts as stored; sent together, the
            # producer can put them in one request and the caller waits one round trip, not two.
            await asyncio.gather(
                self._producer.send_and_wait(
                    self._topics.stored,
                    stored.SerializeToString(),
                    key=facts.study_instance_uid.encode(),
                    headers=headers_for(stored, ctx.trace_id or None),
                ),
                self._audit.emit(
                    Action.AUDIT_ACTION_INSTANCE_STORED,
                    Outcome.AUDIT_OUTCOME_SUCCESS,
                    ctx.actor,
                    study_instance_uid=facts.study_instance_uid,
                    sop_instance_uid=facts.sop_instance_uid,
                    object_id=object_id,
                    patient_ref=sealed.object.erasure_key_ref,
                    trace_id=ctx.trace_id,
                    details={
                        "sop_class_uid": facts.sop_class_uid,
                        "bytes": str(len(data)),
                        "request_id": ctx.request_id,
                        "source": ctx.source,
                        **({"warnings": ",".join(facts.warnings)} if facts.warnings else {}),
                    },
                    event_id=stable_event_id("stored", object_id),
                ),
            )
        except Exception as exc:  # noqa: BLE001 - broker trouble: the record stays uncommitted
            raise TransientError(f"publishing stored event failed ({type(exc).__name__})") from None
        log.info(
            "instance stored",
            extra={"object_id": object_id, "bytes": len(data), "redelivery": sealed.already_stored, "at": ctx.position},
        )
        if facts.warnings:
            # Rule codes only: accepted as sent, but the sender's system has something to fix.
            log.warning("instance stored with warnings", extra={"object_id": object_id, "warnings": facts.warnings})
        return StoredInstance(stored, sealed.object.erasure_key_ref, facts)

    async def record_refusal(self, ctx: StoreContext, refusal: Refused) -> None:
        """Audit a refused instance; TransientError when the audit stream is down (retry, do not drop)."""
        try:
            await self._audit.emit(
                Action.AUDIT_ACTION_INSTANCE_REJECTED,
                Outcome.AUDIT_OUTCOME_FAILURE,
                ctx.actor,
                reason=f"{refusal.code}: {refusal.reason}",
                trace_id=ctx.trace_id,
                details={"source_record": ctx.position, "source": ctx.source},
                event_id=stable_event_id("rejected", ctx.position),
            )
        except Exception as exc:  # noqa: BLE001
            raise TransientError(f"audit unavailable ({type(exc).__name__})") from None
