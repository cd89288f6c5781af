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


def _when(event: Mapping[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(str(event["occurred_at"]).replace("Z", "+00:00"))


def find_patterns(events: Iterable[Mapping[str, Any]], rules: Rules) -> list[Finding]:
    zone = ZoneInfo(rules.timezone)
    off_hours: dict[str, int] = defaultdict(int)
    patients: dict[str, set[str]] = defaultdict(set)
    denials: dict[str, deque[dt.datetime]] = defaultdict(deque)
    worst_burst: dict[str, int] = {}
    findings: list[Finding] = []
    for event in events:
        actor, action, outcome = str(event.get("actor", "")), event.get("action"), event.get("outcome")
        if action in DISCLOSURES and outcome == SUCCESS:
            hour = _when(event).astimezone(zone).hour
            if not rules.work_start_hour <= hour < rules.work_end_hour:
                off_hours[actor] += 1
            if event.get("patient_ref"):
                patients[actor].add(str(event["patient_ref"]))
        elif action == DECISION and outcome == DENIED:
            window = denials[actor]
            window.append(_when(event))
            while window and window[-1] - window[0] > rules.denial_window:
                window.popleft()
            worst_burst[actor] = max(worst_burst.get(actor, 0), len(window))
        elif action == OVERRIDE:
            findings.append(Finding("break_glass", actor, 1, f"emergency override: {event.get('reason', '')}"))
        elif action == ERASURE:
            findings.append(Finding("erasure", actor, 1, f"patient erased: {event.get('reason', '')}"))
    local = f"{rules.work_start_hour:02d}:00-{rules.work_end_hour:02d}:00 {rules.timezone}"
    findings += [
        Finding("off_hours", actor, n, f"{n} disclosures outside working hours {local}")
        for actor, n in off_hours.items()
    ]
    findings += [
        Finding("many_patients", actor, len(refs), f"{len(refs)} distinct patients (threshold {rules.many_patients})")
        for actor, refs in patients.items()
        if len(refs) >= rules.many_patients
    ]
    minutes = int(rules.denial_window.total_seconds() // 60)
    findings += [
        Finding("denial_burst", actor, n, f"{n} refusals within {minutes} min (threshold {rules.denial_burst})")
        for actor, n in worst_burst.items()
        if n >= rules.denial_burst
    ]
    return sorted(findings, key=lambda f: (f.rule, f.actor))
