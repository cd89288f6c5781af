"""Emitting audit events to ``audit.events``: one place, so every service records the same shape."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaProducer

from dicomsafe.common.kafka import headers_for
from dicomsafe.v1 import audit_pb2


class AuditEmitter:
    def __init__(self, producer: AIOKafkaProducer, service: str, topic: str) -> None:
        self._producer = producer
        self._service = service
        self._topic = topic

    async def emit(
        self,
        action: audit_pb2.AuditAction.ValueType,
        outcome: audit_pb2.AuditOutcome.ValueType,
        actor: str,
        *,
        actor_roles: Iterable[str] = (),
        study_instance_uid: str = "",
        sop_instance_uid: str = "",
        object_id: str = "",
        patient_ref: str = "",
        reason: str = "",
        trace_id: str = "",
        details: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> audit_pb2.AuditEvent:
        """Publish and wait until the broker has it: callers commit their own work after this.

        ``event_id`` should be derived from the triggering input when redelivery is
        possible, so the audit store records a redelivered event once.
        """
        event = audit_pb2.AuditEvent(
            event_id=event_id or str(uuid.uuid4()),
            service=self._service,
            action=action,
            outcome=outcome,
            actor=actor,
            actor_roles=list(actor_roles),
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            object_id=object_id,
            patient_ref=patient_ref,
            reason=reason,
            trace_id=trace_id,
            details=dict(details or {}),
        )
        event.occurred_at.GetCurrentTime()
        await self._producer.send_and_wait(
            self._topic,
            event.SerializeToString(),
            key=actor.encode(),
            headers=headers_for(event, trace_id or None),
        )
        return event


def stable_event_id(*parts: str) -> str:
    """A UUID fixed by its inputs, so retries of the same step emit the same event id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "dicomsafe:" + "|".join(parts)))
