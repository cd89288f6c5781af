"""Raising security alerts on ``security.alerts``: one place, so every service sends the same shape."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from dicomsafe.common.kafka import headers_for
from dicomsafe.v1 import alerts_pb2


class AlertEmitter:
    def __init__(self, producer: AIOKafkaProducer, service: str, topic: str) -> None:
        self._producer = producer
        self._service = service
        self._topic = topic

    async def raise_alert(
        self,
        alert_id: str,
        rule: str,
        severity: str,
        summary: str,
        *,
        subjects: Iterable[str] = (),
        patient_refs: Iterable[str] = (),
        evidence_event_ids: Iterable[str] = (),
    ) -> alerts_pb2.SecurityAlert:
        """Publish and wait until the broker has it.

        ``alert_id`` must be stable for the same evidence (see ``stable_event_id``): an alert
        raised again after a crash is then recognisably the same one downstream.
        """
        alert = alerts_pb2.SecurityAlert(
            alert_id=alert_id,
            rule=rule,
            severity=severity,
            summary=summary,
            subjects=list(subjects),
            patient_refs=list(patient_refs),
            evidence_event_ids=list(evidence_event_ids),
            source=self._service,
        )
        alert.raised_at.GetCurrentTime()
        return await self.publish(alert)

    async def publish(self, alert: alerts_pb2.SecurityAlert) -> alerts_pb2.SecurityAlert:
        """Publish an alert built elsewhere (e.g. from an audit finding); waits for the broker."""
        await self._producer.send_and_wait(
            self._topic, alert.SerializeToString(), key=alert.alert_id.encode(), headers=headers_for(alert)
        )
        return alert
