"""Security alerts from the unusual-pattern rules, on `security.alerts`, once per evidence.

Every interval the rules of `patterns.py` run over the last window of recorded events. A
finding becomes a `SecurityAlert` naming its rule, its explanation and the audit event ids
behind it. An alert's id is derived from rule, subject and evidence, and a marker per raised
alert is inserted in the audit database (insert + find: all the writer may do), so a restart,
a second replica or the next run over an overlapping window does not raise it again; a
finding is raised again only when it has evidence no earlier alert of that rule and subject
carried. Publishing comes before the marker: a crash between the two re-raises the same
alert id once (at least once; consumers dedupe on the id).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid

from aiokafka.errors import KafkaError
from pymongo.errors import PyMongoError

from dicomsafe.common.alert_emitter import AlertEmitter
from dicomsafe.v1 import alerts_pb2
from services.audit.patterns import Finding, Rules, find_patterns
from services.audit.store import AuditStore

log = logging.getLogger("dicomsafe.audit.alerts")

SOURCE = "audit"
# Refusal bursts, unusual disclosure volume and use of ended grants need a look soon; access to
# sensitive studies, break-glass (authz already raised it when it started) and erasures are
# listed for the routine review.
SEVERITY = {
    "denial_burst": "warning",
    "many_patients": "warning",
    "off_hours": "warning",
    "after_grant_end": "warning",
    "sensitive_access": "info",
    "break_glass": "info",
    "erasure": "info",
}
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "dicomsafe:security-alert")


def alert_id(finding: Finding) -> str:
    """Stable for the same rule, subject and evidence: the same finding always has one id."""
    basis = "\n".join([finding.rule, finding.actor, *sorted(finding.evidence)])
    return str(uuid.uuid5(_ID_NAMESPACE, basis))


def to_alert(finding: Finding, raised_at: dt.datetime) -> alerts_pb2.SecurityAlert:
    alert = alerts_pb2.SecurityAlert(
        alert_id=alert_id(finding),
        rule=finding.rule,
        severity=SEVERITY.get(finding.rule, "warning"),
        summary=f"{finding.actor}: {finding.explanation}",
        subjects=[finding.actor],
        patient_refs=list(finding.patient_refs),
        evidence_event_ids=sorted(finding.evidence),
        source=SOURCE,
    )
    alert.raised_at.FromDatetime(raised_at)
    return alert


class AlertRaiser:
    def __init__(self, store: AuditStore, alerts: AlertEmitter, rules: Rules, window: dt.timedelta) -> None:
        self._store = store
        self._alerts = alerts
        self._rules = rules
        self._window = window

    async def run_once(self, now: dt.datetime | None = None) -> list[alerts_pb2.SecurityAlert]:
        """Apply the rules to the window ending now; publish and mark what is new."""
        now = now or dt.datetime.now(dt.UTC)
        events = [e async for e in self._store.events_between(now - self._window, now)]
        raised = []
        for finding in find_patterns(events, self._rules):
            if not finding.evidence:
                continue
            if set(finding.evidence) <= await self._store.alerted_evidence(finding.rule, finding.actor):
                continue
            alert = to_alert(finding, now)
            await self._alerts.publish(alert)
            await self._store.mark_alerted(alert.alert_id, finding.rule, finding.actor, finding.evidence, now)
            raised.append(alert)
        return raised


async def alert_forever(raiser: AlertRaiser, interval_s: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            raised = await raiser.run_once()
            if raised:
                log.info("security alerts raised", extra={"alerts": len(raised)})
        except (PyMongoError, KafkaError) as exc:
            # Nothing is marked that was not published: the next run raises what is missing.
            log.warning("pattern alerts not raised; will retry", extra={"error": type(exc).__name__})
        except Exception as exc:  # noqa: BLE001 — a faulty rule must not stop the audit consumer
            log.error("pattern rules failed; will retry", extra={"error": type(exc).__name__})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
