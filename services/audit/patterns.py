"""The unusual-pattern report: explicit, explainable rules over a window of audit events.

Each rule names what it saw, for whom, and the threshold it crossed, so a privacy officer can
judge a finding without trusting a black box. Events are the stored JSON form (proto field
names), as the store returns them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from dicomsafe.v1 import audit_pb2

_name = audit_pb2.AuditAction.Name
DISCLOSURES = {_name(audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED)}
DECISION = _name(audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION)
OVERRIDE = _name(audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE)
ERASURE = _name(audit_pb2.AuditAction.AUDIT_ACTION_PATIENT_ERASED)
SUCCESS = audit_pb2.AuditOutcome.Name(audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS)
DENIED = audit_pb2.AuditOutcome.Name(audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED)


@dataclass(frozen=True)
class Rules:
    timezone: str = "UTC"
    # Local working hours [start, end); disclosures outside them are reported.
    work_start_hour: int = 7
    work_end_hour: int = 20
    many_patients: int = 20
    denial_burst: int = 5
    denial_window: dt.timedelta = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Finding:
    rule: str
    actor: str
    count: int
    explanation: str
    # The audit event ids that made the rule fire, so a reviewer can check the reasoning.
    evidence: tuple[str, ...] = ()
    patient_refs: tuple[str, ...] = ()


def _when(event: Mapping[str, Any]) -> dt.datetime | None:
    """When it happened; None for an event whose emitter set no (or no readable) time."""
    try:
        return dt.datetime.fromisoformat(str(event["occurred_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


def find_patterns(events: Iterable[Mapping[str, Any]], rules: Rules) -> list[Finding]:
    zone = ZoneInfo(rules.timezone)
    off_hours: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    disclosed: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    patients: dict[str, set[str]] = defaultdict(set)
    denials: dict[str, deque[tuple[dt.datetime, str]]] = defaultdict(deque)
    worst_burst: dict[str, list[str]] = {}
    findings: list[Finding] = []
    for event in events:
        actor, action, outcome = str(event.get("actor", "")), event.get("action"), event.get("outcome")
        event_id = str(event.get("event_id", ""))
        when = _when(event)
        if action in DISCLOSURES and outcome == SUCCESS:
            if when is not None and not rules.work_start_hour <= when.astimezone(zone).hour < rules.work_end_hour:
                off_hours[actor].append(event)
            if event.get("patient_ref"):
                patients[actor].add(str(event["patient_ref"]))
                disclosed[actor].append(event)
        elif action == DECISION and outcome == DENIED and when is not None:
            window = denials[actor]
            window.append((when, event_id))
            while window and window[-1][0] - window[0][0] > rules.denial_window:
                window.popleft()
            if len(window) > len(worst_burst.get(actor, ())):
                worst_burst[actor] = [i for _, i in window]
        elif action == OVERRIDE and (event.get("details") or {}).get("override", "started") == "started":
            # One finding per use of break-glass: its "stopped" event closes the same episode.
            findings.append(
                Finding("break_glass", actor, 1, f"emergency override: {event.get('reason', '')}", (event_id,))
            )
        elif action == ERASURE:
            findings.append(
                Finding("erasure", actor, 1, f"patient erased: {event.get('reason', '')}", (event_id,), _refs([event]))
            )
    local = f"{rules.work_start_hour:02d}:00-{rules.work_end_hour:02d}:00 {rules.timezone}"
    findings += [
        Finding(
            "off_hours", actor, len(evs), f"{len(evs)} disclosures outside working hours {local}", _ids(evs), _refs(evs)
        )
        for actor, evs in off_hours.items()
    ]
    findings += [
        Finding(
            "many_patients",
            actor,
            len(refs),
            f"{len(refs)} distinct patients (threshold {rules.many_patients})",
            _ids(disclosed[actor]),
            tuple(sorted(refs)),
        )
        for actor, refs in patients.items()
        if len(refs) >= rules.many_patients
    ]
    minutes = int(rules.denial_window.total_seconds() // 60)
    findings += [
        Finding(
            "denial_burst",
            actor,
            len(ids),
            f"{len(ids)} refusals within {minutes} min (threshold {rules.denial_burst})",
            tuple(ids),
        )
        for actor, ids in worst_burst.items()
        if len(ids) >= rules.denial_burst
    ]
    return sorted(findings, key=lambda f: (f.rule, f.actor))


def _ids(events: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(e.get("event_id", "")) for e in events)


def _refs(events: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(sorted({str(e["patient_ref"]) for e in events if e.get("patient_ref")}))
