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
GRANT = _name(audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED)
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
    # Labels (authz's access decisions carry the resource's in details["labels"]) that make a
    # study sensitive; None = any label does (the gateway labels only restricted studies).
    sensitive_labels: frozenset[str] | None = None


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


@dataclass
class _Grant:
    """A time-limited grant as authz recorded it (GRANT_CHANGED, or an emergency override)."""

    grant_id: str
    grantee: str
    role: str
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    event_ids: list[str]
    revoked_at: dt.datetime | None = None

    def ended(self) -> dt.datetime | None:
        ends = [t for t in (self.not_after, self.revoked_at) if t is not None]
        return min(ends) if ends else None

    def in_force(self, at: dt.datetime) -> bool:
        end = self.ended()
        return (self.not_before is None or self.not_before <= at) and (end is None or at < end)


def _time(text: object) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _note_grant(grants: dict[str, _Grant], event: Mapping[str, Any], when: dt.datetime | None) -> None:
    """Track a grant's window and revocation from authz's events about it."""
    details = event.get("details") or {}
    grant_id = str(details.get("grant_id", ""))
    if not grant_id or event.get("outcome") != SUCCESS:
        return
    # GRANT_CHANGED is recorded with the manager as actor and the grantee in details; an
    # override is its grantee's own act. A grant to every holder of a role names no one: its
    # ending takes nobody's own access away, so it is not tracked (never blamed on the manager).
    if details.get("grantee_role"):
        return
    override = event.get("action") == _name(audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE)
    grantee = str(details.get("grantee") or (event.get("actor", "") if override else ""))
    if not grantee:
        return
    grant = grants.setdefault(
        grant_id,
        _Grant(
            grant_id,
            grantee,
            str(details.get("role", "")),
            _time(details.get("not_before")),
            _time(details.get("not_after")),
            [],
        ),
    )
    grant.event_ids.append(str(event.get("event_id", "")))
    reason = str(event.get("reason", ""))
    revoked = reason.startswith("grant revoked") or (
        details.get("override") == "stopped" and reason.endswith("revoked")
    )
    if revoked and when is not None:
        grant.revoked_at = min(grant.revoked_at or when, when)


def find_patterns(events: Iterable[Mapping[str, Any]], rules: Rules) -> list[Finding]:
    zone = ZoneInfo(rules.timezone)
    off_hours: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    disclosed: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    patients: dict[str, set[str]] = defaultdict(set)
    denials: dict[str, deque[tuple[dt.datetime, str]]] = defaultdict(deque)
    worst_burst: dict[str, list[str]] = {}
    sensitive: dict[str, list[tuple[Mapping[str, Any], tuple[str, ...]]]] = defaultdict(list)
    grants: dict[str, _Grant] = {}
    decisions: dict[str, list[tuple[dt.datetime, Mapping[str, Any]]]] = defaultdict(list)
    findings: list[Finding] = []
    for event in events:
        actor, action, outcome = str(event.get("actor", "")), event.get("action"), event.get("outcome")
        event_id = str(event.get("event_id", ""))
        when = _when(event)
        if action in (GRANT, OVERRIDE):
            _note_grant(grants, event, when)
        if action == DECISION:
            labels = _labels(event, rules)
            if labels:
                sensitive[actor].append((event, labels))
            if when is not None:
                decisions[actor].append((when, event))
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
    findings += [_sensitive_finding(actor, seen) for actor, seen in sensitive.items()]
    findings += _ended_grant_findings(grants, decisions)
    return sorted(findings, key=lambda f: (f.rule, f.actor))


def _labels(event: Mapping[str, Any], rules: Rules) -> tuple[str, ...]:
    """The sensitive labels of the resource an access decision was about."""
    raw = str((event.get("details") or {}).get("labels", ""))
    labels = {label.strip() for label in raw.split(",") if label.strip()}
    if rules.sensitive_labels is not None:
        labels &= rules.sensitive_labels
    return tuple(sorted(labels))


def _sensitive_finding(actor: str, seen: list[tuple[Mapping[str, Any], tuple[str, ...]]]) -> Finding:
    """Every access decision on a sensitive study, allowed or refused, for the routine review:
    these are the studies whose readers a privacy officer is expected to look at."""
    labels = sorted({label for _, ls in seen for label in ls})
    allowed = sum(1 for e, _ in seen if e.get("outcome") == SUCCESS)
    events = [e for e, _ in seen]
    return Finding(
        "sensitive_access",
        actor,
        len(seen),
        f"{len(seen)} access decisions on sensitive studies ({', '.join(labels)}): "
        f"{allowed} allowed, {len(seen) - allowed} refused",
        _ids(events),
        _refs(events),
    )


def _ended_grant_findings(
    grants: dict[str, _Grant], decisions: dict[str, list[tuple[dt.datetime, Mapping[str, Any]]]]
) -> list[Finding]:
    """Access attempts by a subject after a grant of theirs ended (expired or revoked) while no
    grant of theirs seen in the window was in force: someone still using access taken away.
    Counted: refusals, and allowed decisions that name the ended grant's role (authz no longer
    loads an ended grant, so those came from a standing binding of the same role — or from a
    grant authz should not have honoured; either way worth a look). An allowance by another
    role is the subject's standing right and not counted. The grant's own events are evidence
    too, so a reviewer sees which grant and why it ended."""
    by_grantee: dict[str, list[_Grant]] = defaultdict(list)
    for grant in grants.values():
        by_grantee[grant.grantee].append(grant)
    findings = []
    for grantee, theirs in by_grantee.items():
        for grant in theirs:
            end = grant.ended()
            if end is None:
                continue
            late = [
                event
                for when, event in decisions.get(grantee, [])
                if when >= end
                and not any(g.in_force(when) for g in theirs)
                and (event.get("outcome") != SUCCESS or (grant.role and grant.role in event.get("actor_roles", ())))
            ]
            if not late:
                continue
            how = "revoked" if grant.revoked_at is not None and grant.revoked_at <= end else "expired"
            refused = sum(1 for e in late if e.get("outcome") != SUCCESS)
            findings.append(
                Finding(
                    "after_grant_end",
                    grantee,
                    len(late),
                    f"{len(late)} access attempts ({refused} refused) after grant {grant.grant_id} "
                    f"(role {grant.role or '?'}) {how} at {end.isoformat()}",
                    (*grant.event_ids, *_ids(late)),
                    _refs(late),
                )
            )
    return findings


def _ids(events: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(e.get("event_id", "")) for e in events)


def _refs(events: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(sorted({str(e["patient_ref"]) for e in events if e.get("patient_ref")}))
