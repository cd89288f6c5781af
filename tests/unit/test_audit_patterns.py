from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from dicomsafe.v1 import audit_pb2
from services.audit.alerts import alert_id, to_alert
from services.audit.patterns import Rules, find_patterns

A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.UTC)


def _ev(
    action: int, actor: str, at: dt.datetime, outcome: int = Out.AUDIT_OUTCOME_SUCCESS, **extra: str
) -> dict[str, Any]:
    return {
        "action": A.Name(action),  # type: ignore[arg-type]
        "outcome": Out.Name(outcome),  # type: ignore[arg-type]
        "actor": actor,
        "occurred_at": at.isoformat().replace("+00:00", "Z"),
        **extra,
    }


def test_quiet_day_has_no_findings() -> None:
    events = [_ev(A.AUDIT_ACTION_INSTANCE_RETRIEVED, "dr.house", T0, patient_ref=f"{i:032x}") for i in range(5)]
    assert find_patterns(events, Rules()) == []


def test_off_hours_in_the_hospitals_timezone() -> None:
    night_utc = dt.datetime(2026, 11, 25, 2, 30, tzinfo=dt.UTC)
    events = [
        _ev(A.AUDIT_ACTION_INSTANCE_RETRIEVED, "dr.owl", night_utc),
        _ev(A.AUDIT_ACTION_INSTANCE_RETRIEVED, "dr.owl", T0),
    ]
    [finding] = find_patterns(events, Rules())
    assert (finding.rule, finding.actor, finding.count) == ("off_hours", "dr.owl", 1)
    assert "07:00-20:00 UTC" in finding.explanation
    # 02:30 UTC is 11:30 in Tokyo, inside working hours; 10:00 UTC is 19:00 there, too.
    assert find_patterns(events, Rules(timezone="Asia/Tokyo")) == []


def test_one_user_touching_many_patients() -> None:
    events = [_ev(A.AUDIT_ACTION_INSTANCE_RETRIEVED, "dr.curious", T0, patient_ref=f"{i:032x}") for i in range(25)]
    events += [_ev(A.AUDIT_ACTION_INSTANCE_RETRIEVED, "dr.house", T0, patient_ref="ab" * 16) for _ in range(30)]
    findings = find_patterns(events, Rules(many_patients=20))
    assert [(f.rule, f.actor, f.count) for f in findings] == [("many_patients", "dr.curious", 25)]


def test_burst_of_denials_within_the_window_only() -> None:
    burst = [
        _ev(A.AUDIT_ACTION_ACCESS_DECISION, "mallory", T0 + dt.timedelta(minutes=i), Out.AUDIT_OUTCOME_DENIED)
        for i in range(6)
    ]
    spread = [
        _ev(A.AUDIT_ACTION_ACCESS_DECISION, "dr.slow", T0 + dt.timedelta(hours=i), Out.AUDIT_OUTCOME_DENIED)
        for i in range(6)
    ]
    findings = find_patterns(burst + spread, Rules(denial_burst=5))
    assert [(f.rule, f.actor, f.count) for f in findings] == [("denial_burst", "mallory", 6)]


def test_break_glass_and_erasures_are_always_reported() -> None:
    events = [
        _ev(A.AUDIT_ACTION_EMERGENCY_OVERRIDE, "dr.er", T0, reason="trauma bay 2"),
        _ev(A.AUDIT_ACTION_PATIENT_ERASED, "dpo.lee", T0, reason="GDPR request #42"),
    ]
    findings = find_patterns(events, Rules())
    assert [(f.rule, f.actor) for f in findings] == [("break_glass", "dr.er"), ("erasure", "dpo.lee")]
    assert "trauma bay 2" in findings[0].explanation


def test_one_break_glass_episode_is_one_finding() -> None:
    """authz records Started and Stopped for each override; only the start is a finding."""
    started = _ev(A.AUDIT_ACTION_EMERGENCY_OVERRIDE, "dr.er", T0, reason="trauma bay 2")
    started["details"] = {"override": "started", "grant_id": "g1"}
    stopped = _ev(A.AUDIT_ACTION_EMERGENCY_OVERRIDE, "dr.er", T0 + dt.timedelta(minutes=30), reason="expired")
    stopped["details"] = {"override": "stopped", "grant_id": "g1"}
    assert [(f.rule, f.actor) for f in find_patterns([started, stopped], Rules())] == [("break_glass", "dr.er")]


def test_findings_name_their_evidence_and_alert_ids_are_stable() -> None:
    burst = [
        _ev(A.AUDIT_ACTION_ACCESS_DECISION, "mallory", T0 + dt.timedelta(minutes=i), Out.AUDIT_OUTCOME_DENIED)
        | {"event_id": f"e{i}"}
        for i in range(6)
    ]
    # An event without a time (a faulty emitter) is not evaluated by the time rules, nor fatal.
    untimed = {k: v for k, v in burst[0].items() if k != "occurred_at"} | {"event_id": "untimed"}
    [finding] = find_patterns([*burst, untimed], Rules(denial_burst=5))
    assert finding.evidence == tuple(f"e{i}" for i in range(6))
    reordered = find_patterns(list(reversed(burst)), Rules(denial_burst=5))[0]
    assert alert_id(reordered) == alert_id(finding)
    assert alert_id(replace(finding, evidence=finding.evidence[1:])) != alert_id(finding)
    alert = to_alert(finding, T0)
    assert (alert.rule, alert.severity, alert.source, list(alert.subjects)) == (
        "denial_burst",
        "warning",
        "audit",
        ["mallory"],
    )
    assert list(alert.evidence_event_ids) == sorted(finding.evidence)
    assert alert.raised_at.ToDatetime(tzinfo=dt.UTC) == T0


def _decision(actor: str, at: dt.datetime, outcome: int, event_id: str, **details: str) -> dict[str, Any]:
    return _ev(A.AUDIT_ACTION_ACCESS_DECISION, actor, at, outcome, event_id=event_id) | {"details": details}


def test_every_access_decision_on_a_sensitive_study_is_reported() -> None:
    events = [
        _decision("dr.house", T0, Out.AUDIT_OUTCOME_SUCCESS, "a1", labels="vip"),
        _decision("dr.house", T0, Out.AUDIT_OUTCOME_DENIED, "a2", labels="psychiatry,vip"),
        _decision("dr.house", T0, Out.AUDIT_OUTCOME_SUCCESS, "a3", labels=""),  # not sensitive
        _decision("dr.wilson", T0, Out.AUDIT_OUTCOME_SUCCESS, "a4", labels="research"),
    ]
    findings = find_patterns(events, Rules())
    assert [(f.rule, f.actor, f.count, f.evidence) for f in findings] == [
        ("sensitive_access", "dr.house", 2, ("a1", "a2")),
        ("sensitive_access", "dr.wilson", 1, ("a4",)),
    ]
    assert findings[0].explanation == "2 access decisions on sensitive studies (psychiatry, vip): 1 allowed, 1 refused"
    # A hospital may name which labels count; "research" then does not.
    narrowed = find_patterns(events, Rules(sensitive_labels=frozenset({"vip", "psychiatry"})))
    assert [(f.actor, f.evidence) for f in narrowed] == [("dr.house", ("a1", "a2"))]


def _grant(event_id: str, at: dt.datetime, reason: str, **details: str) -> dict[str, Any]:
    return _ev(A.AUDIT_ACTION_GRANT_CHANGED, "dpo.lee", at, reason=reason, event_id=event_id) | {"details": details}


def test_access_attempts_after_a_grant_expired_or_was_revoked() -> None:
    window = {
        "not_before": T0.isoformat(),
        "not_after": (T0 + dt.timedelta(hours=1)).isoformat(),
        "role": "radiologist",
    }
    events = [
        _grant("g-new", T0, "grant created: locum cover", grant_id="G1", grantee="dr.locum", **window),
        _decision("dr.locum", T0 + dt.timedelta(minutes=30), Out.AUDIT_OUTCOME_SUCCESS, "in-time"),
        # After not_after: refused, and once more later.
        _decision("dr.locum", T0 + dt.timedelta(minutes=61), Out.AUDIT_OUTCOME_DENIED, "late-1"),
        _decision("dr.locum", T0 + dt.timedelta(hours=3), Out.AUDIT_OUTCOME_DENIED, "late-2"),
        # Allowed afterwards: by another (standing) role it is not counted, by the grant's role it is.
        _decision("dr.locum", T0 + dt.timedelta(hours=4), Out.AUDIT_OUTCOME_SUCCESS, "standing")
        | {"actor_roles": ["teaching"]},
        _decision("dr.locum", T0 + dt.timedelta(hours=5), Out.AUDIT_OUTCOME_SUCCESS, "same-role")
        | {"actor_roles": ["radiologist"]},
        _grant("g2-new", T0, "grant created: consult", grant_id="G2", grantee="dr.consult", **window),
        _grant(
            "g2-rev",
            T0 + dt.timedelta(minutes=10),
            "grant revoked: ended early",
            grant_id="G2",
            grantee="dr.consult",
            **window,
        ),
        _decision("dr.consult", T0 + dt.timedelta(minutes=5), Out.AUDIT_OUTCOME_SUCCESS, "before-revocation"),
        _decision("dr.consult", T0 + dt.timedelta(minutes=20), Out.AUDIT_OUTCOME_DENIED, "after-revocation"),
        # Someone with no grant at all is refused: that is a denial, not use of an ended grant.
        _decision("dr.nobody", T0 + dt.timedelta(hours=2), Out.AUDIT_OUTCOME_DENIED, "never-granted"),
    ]
    findings = [f for f in find_patterns(events, Rules()) if f.rule == "after_grant_end"]
    assert [(f.actor, f.count, f.evidence) for f in findings] == [
        ("dr.consult", 1, ("g2-new", "g2-rev", "after-revocation")),
        ("dr.locum", 3, ("g-new", "late-1", "late-2", "same-role")),
    ]
    assert findings[0].explanation == (
        "1 access attempts (1 refused) after grant G2 (role radiologist) revoked at "
        f"{(T0 + dt.timedelta(minutes=10)).isoformat()}"
    )
    assert "after grant G1 (role radiologist) expired at" in findings[1].explanation


def test_a_renewed_grant_is_not_an_ended_one() -> None:
    first = {"not_before": T0.isoformat(), "not_after": (T0 + dt.timedelta(hours=1)).isoformat()}
    second = {
        "not_before": (T0 + dt.timedelta(hours=1)).isoformat(),
        "not_after": (T0 + dt.timedelta(hours=9)).isoformat(),
    }
    events = [
        _grant("g1", T0, "grant created: shift 1", grant_id="G1", grantee="dr.locum", **first),
        _grant("g2", T0, "grant created: shift 2", grant_id="G2", grantee="dr.locum", **second),
        _decision("dr.locum", T0 + dt.timedelta(hours=2), Out.AUDIT_OUTCOME_SUCCESS, "covered"),
    ]
    assert [f for f in find_patterns(events, Rules()) if f.rule == "after_grant_end"] == []


def test_access_after_a_break_glass_override_was_revoked() -> None:
    """An override's Started/Stopped events (actor = the grantee) describe its grant too."""
    details = {"grant_id": "BG1", "not_before": T0.isoformat(), "not_after": (T0 + dt.timedelta(hours=4)).isoformat()}
    started = _ev(
        A.AUDIT_ACTION_EMERGENCY_OVERRIDE, "dr.er", T0, reason="emergency override started: trauma", event_id="s"
    ) | {"details": {**details, "override": "started"}}
    stopped = _ev(
        A.AUDIT_ACTION_EMERGENCY_OVERRIDE,
        "dr.er",
        T0 + dt.timedelta(minutes=15),
        reason="emergency override stopped: revoked",
        event_id="t",
    ) | {"details": {**details, "override": "stopped"}}
    late = _decision("dr.er", T0 + dt.timedelta(minutes=40), Out.AUDIT_OUTCOME_DENIED, "late")
    findings = [f for f in find_patterns([started, stopped, late], Rules()) if f.rule == "after_grant_end"]
    assert [(f.actor, f.evidence) for f in findings] == [("dr.er", ("s", "t", "late"))]
    assert "revoked" in findings[0].explanation


def test_a_grant_to_every_holder_of_a_role_is_never_blamed_on_its_manager() -> None:
    """A role grant names no grantee; its end takes no one person's access away, and the
    registrar who made it is not "someone still using access taken away"."""
    window = {"not_before": T0.isoformat(), "not_after": (T0 + dt.timedelta(hours=1)).isoformat()}
    events = [
        _grant("r-new", T0, "grant created: weekend cover", grant_id="R1", grantee="", grantee_role="locum", **window),
        _decision("dpo.lee", T0 + dt.timedelta(hours=2), Out.AUDIT_OUTCOME_DENIED, "manager-later"),
    ]
    assert [f for f in find_patterns(events, Rules()) if f.rule == "after_grant_end"] == []
