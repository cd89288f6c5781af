"""The record authz keeps of what it does: the audit stream and the security alerts topic.

Every write waits for Kafka's acknowledgement, bounded in time; anything short of that raises
``AuditUnavailable`` and the caller fails closed. A send abandoned on timeout may still reach
the topic later: the trail can over-report an unanswered decision, never miss one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from dicomsafe.common.alert_emitter import AlertEmitter
from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.v1 import audit_pb2


class AuditUnavailable(Exception):
    """The event was not acknowledged by Kafka (no producer, broker down, timeout)."""


class Trail:
    def __init__(self, timeout_s: float = 5.0) -> None:
        self._timeout_s = timeout_s
        # None until the producer is connected: until then every write fails closed.
        self._audit: AuditEmitter | None = None
        self._alerts: AlertEmitter | None = None

    def connect(self, audit: AuditEmitter | None, alerts: AlertEmitter | None) -> None:
        self._audit, self._alerts = audit, alerts

    @property
    def connected(self) -> bool:
        return self._audit is not None and self._alerts is not None

    def _timeout(self, budget_s: float | None) -> float:
        return self._timeout_s if budget_s is None else max(0.0, min(self._timeout_s, budget_s))

    async def audit(
        self,
        action: audit_pb2.AuditAction.ValueType,
        outcome: audit_pb2.AuditOutcome.ValueType,
        actor: str,
        *,
        budget_s: float | None = None,
        actor_roles: Iterable[str] = (),
        study_instance_uid: str = "",
        object_id: str = "",
        patient_ref: str = "",
        reason: str = "",
        details: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> None:
        if self._audit is None:
            raise AuditUnavailable("audit producer not connected")
        emit = self._audit.emit(
            action,
            outcome,
            actor,
            actor_roles=actor_roles,
            study_instance_uid=study_instance_uid,
            object_id=object_id,
            patient_ref=patient_ref,
            reason=reason,
            details=details,
            event_id=event_id,
        )
        try:
            # asyncio.timeout, unlike wait_for, needs no extra task per event.
            async with asyncio.timeout(self._timeout(budget_s)):
                await emit
        except Exception as exc:  # KafkaError, TimeoutError, ...: all mean "not recorded"
            raise AuditUnavailable(type(exc).__name__) from exc

    async def alert(
        self,
        alert_id: str,
        rule: str,
        severity: str,
        summary: str,
        *,
        subjects: Iterable[str] = (),
        patient_refs: Iterable[str] = (),
        evidence_event_ids: Iterable[str] = (),
    ) -> None:
        if self._alerts is None:
            raise AuditUnavailable("alert producer not connected")
        raise_alert = self._alerts.raise_alert(
            alert_id,
            rule,
            severity,
            summary,
            subjects=subjects,
            patient_refs=patient_refs,
            evidence_event_ids=evidence_event_ids,
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                await raise_alert
        except Exception as exc:
            raise AuditUnavailable(type(exc).__name__) from exc
