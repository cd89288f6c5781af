"""The decision matrix, against the running service over gRPC with real tokens, grants in MongoDB
and the audit stream in Kafka.

Dimensions, generated as full products: role x action x scope (all, department, patient, study)
x time (before, within, after a grant) x resource (inside / outside the scope) x MFA x sensitivity
label; standing role bindings of the policy file (including a department-bound one) and of
identity-provider groups (mapped, unmapped) x action x resource x MFA x label, with grants to
every holder of one role (before, within, after, revoked); and break-glass (none, active,
revoked) x action x resource x MFA x label.

Expected answers come from the explicit tables and rules below — written from the job
descriptions, not computed by ``decide`` — so a regression in the service shows up as a
difference. Every decision is then looked up in the audit stream by its decision id: exactly
one event per answered check, with the same outcome and reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.common.token_fingerprint import token_fingerprint
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from tests.servers import Servers
from tests.service_runner import authz_config, running_authz
from tests.topic_reader import read_to_end
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = authz_pb2_grpc.AuthzServiceAsyncStub

# -- the expected rules, independent of the implementation ------------------------------------

ACTIONS = (
    "instance.read",
    "instance.read_deidentified",
    "instance.read_metadata",
    "instance.export",
    "instance.delete",
    "instance.store",
    "study.query",
    "audit.read",
    "audit.verify",
    "key.rotate",
    "patient.erase",
    "grants.manage",
    "emergency.access",
)
# Job → what the job needs (issue #5 and the authz README), nothing more.
ROLE_ACTIONS: dict[str, frozenset[str]] = {
    "radiologist": frozenset(
        {"instance.read", "instance.read_metadata", "instance.export", "study.query", "emergency.access"}
    ),
    "referring_physician": frozenset({"instance.read", "instance.read_metadata", "study.query", "emergency.access"}),
    # checks what was stored: headers, not images
    "technologist": frozenset({"instance.store", "instance.read_metadata", "study.query"}),
    "registrar": frozenset({"study.query", "grants.manage"}),
    "emergency_physician": frozenset({"study.query", "emergency.access"}),
    "emergency_reader": frozenset({"instance.read", "instance.read_metadata"}),
    "auditor": frozenset({"audit.read", "audit.verify"}),
    "researcher": frozenset({"instance.read_deidentified", "study.query"}),
    "security_officer": frozenset({"key.rotate"}),
    # erasure and data-subject access requests (an export)
    "privacy_officer": frozenset({"patient.erase", "instance.export", "audit.read"}),
    # corrects mis-filed studies without viewing them
    "pacs_admin": frozenset({"study.query", "instance.read_metadata", "instance.delete"}),
    "svc_ingest": frozenset({"instance.store"}),
    "svc_gateway": frozenset({"study.query"}),
}
DUTIES = {
    ("researcher", "instance.read_deidentified"): ("deidentify",),
    # Query answers to researchers drop identifying attributes (the gateway honours it).
    ("researcher", "study.query"): ("deidentify",),
}
MFA_LABELS = frozenset({"vip", "mental_health", "restricted"})
# Roles a registrar may grant (the break-glass role only comes from break-glass).
GRANTABLE = tuple(r for r in ROLE_ACTIONS if r != "emergency_reader")
# The policy file's people and their standing roles; dr.cameron only within cardiology.
STANDING = {
    "dr.house": ("radiologist", None),
    "dr.wilson": ("referring_physician", None),
    "dr.cameron": ("referring_physician", "cardiology"),
    "tech.jane": ("technologist", None),
    "reg.omar": ("registrar", None),
    "aud.ito": ("auditor", None),
    "res.rao": ("researcher", None),
    "sec.kim": ("security_officer", None),
    "dr.er": ("emergency_physician", None),
    "dpo.lee": ("privacy_officer", None),
    "pacs.ana": ("pacs_admin", None),
    "svc-ingest": ("svc_ingest", None),
    "svc-gateway": ("svc_gateway", None),
}

# Subjects known only by their token's groups claim (the policy's [identity] mapping).
CLAIMS = {"mx.claim.technologist": ["/radiography/staff"], "mx.claim.unmapped": ["/radiography/visitors"]}
CLAIM_ROLES = {"mx.claim.technologist": "technologist"}
# Grants to every technologist (standing or by claim, never by a grant): a referring physician's
# role in the department, one grant per time plus a revoked one; only "within" counts.
HOLDERS, HOLDERS_GET, HOLDERS_SCOPE = "technologist", "referring_physician", "department"

DEPARTMENT = "cardiology"
PATIENT = "5a" * 16  # a patient pseudonym (crypto's erasure key reference shape)
STUDY = "1.2.840.113619.2.55.3.1"


@dataclass(frozen=True)
class Place:
    """A resource: ``inside`` matches every scope used below, ``outside`` none of them."""

    name: str
    department: str
    patient_ref: str
    study: str


INSIDE = Place("inside", DEPARTMENT, PATIENT, STUDY)
OUTSIDE = Place("outside", "oncology", "c3" * 16, "1.2.840.113619.2.55.3.2")
SCOPES = ("all", "department", "patient", "study")
TIMES = ("before", "within", "after")
LABELS: tuple[tuple[str, ...], ...] = ((), ("vip",))


@dataclass(frozen=True)
class Binding:
    role: str
    covers: bool
    break_glass: bool = False


@dataclass(frozen=True)
class Expected:
    allow: bool
    code: str
    obligations: tuple[str, ...] = ()


def expect(bindings: list[Binding], known: bool, action: str, labels: tuple[str, ...], mfa: bool) -> Expected:
    """The rules, in the order the README states them (deny by default)."""
    if not known:
        return Expected(False, "unknown_subject")
    granting = [b for b in bindings if action in ROLE_ACTIONS[b.role]]
    if not granting:
        return Expected(False, "no_role")
    granting = [b for b in granting if b.covers]
    if not granting:
        return Expected(False, "out_of_scope")
    if MFA_LABELS.intersection(labels) and not mfa:
        return Expected(False, "mfa_required", ("mfa-required",))
    duties = {d for b in granting for d in DUTIES.get((b.role, action), ())}
    if all(b.break_glass for b in granting):
        duties.add("break-glass")
    return Expected(True, "granted", tuple(sorted(duties)))


def covers(scope: str | None, place: Place) -> bool:
    return scope in (None, "all") or place is INSIDE


# -- the running service ----------------------------------------------------------------------


@pytest.fixture
async def authz(pki: Pki, servers: Servers, idp: LocalIssuer, unique: str) -> AsyncIterator[tuple[Stub, Topics]]:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = authz_config(
        servers.kafka_bootstrap, topics.prefix, idp, mongodb_uri=servers.mongodb_uri, mongodb_db=f"authz_{unique}"
    )
    async with running_authz(cfg, pki) as stub:
        yield stub, topics


@dataclass(frozen=True)
class Case:
    subject: str
    action: str
    place: Place
    mfa: bool
    labels: tuple[str, ...]
    expected: Expected
    dimension: str


def _scope_fields(scope: str) -> dict[str, str]:
    return {
        "all": {},
        "department": {"department": DEPARTMENT},
        "patient": {"patient_ref": PATIENT},
        "study": {"study_instance_uid": STUDY},
    }[scope]


async def test_decision_matrix(authz: tuple[Stub, Topics], idp: LocalIssuer, servers: Servers) -> None:
    stub, topics = authz
    tokens: dict[tuple[str, bool], str] = {}

    def who(subject: str, mfa: bool) -> authz_pb2.Subject:
        if (subject, mfa) not in tokens:
            groups = {"groups": CLAIMS[subject]} if subject in CLAIMS else None
            amr = ["pwd", "otp"] if mfa else ["pwd"]
            tokens[subject, mfa] = idp.token(subject, amr=amr, lifetime_s=3600, extra=groups)
        return authz_pb2.Subject(access_token=tokens[subject, mfa])

    admin = who("reg.omar", False)

    async def grant(
        subject: str, role: str, start: dt.datetime, end: dt.datetime, scope: str = "all", holders: str = ""
    ) -> str:
        fields = _scope_fields(scope)
        g = authz_pb2.Grant(
            subject=subject,
            grantee_role=holders,
            role=role,
            reason="matrix",
            department=fields.get("department", ""),
            patient_ref=fields.get("patient_ref", ""),
            study_instance_uid=fields.get("study_instance_uid", ""),
        )
        g.not_before.FromDatetime(start)
        g.not_after.FromDatetime(end)
        created = await stub.CreateGrant(authz_pb2.CreateGrantRequest(caller=admin, grant=g))
        return str(created.grant_id)

    # Grants that will be over by the time the checks run are made first.
    now = dt.datetime.now(dt.UTC)
    ends_soon = now + dt.timedelta(seconds=8)
    windows = {
        "after": (now, ends_soon),
        "before": (now + dt.timedelta(hours=1), now + dt.timedelta(hours=2)),
        "within": (now - dt.timedelta(minutes=1), now + dt.timedelta(hours=1)),
    }
    cases: list[Case] = []
    for time_, role, scope in itertools.product(("after", "before", "within"), GRANTABLE, SCOPES):
        subject = f"mx.{role}.{scope}.{time_}"
        await grant(subject, role, *windows[time_], scope)
        for action, place, mfa, labels in itertools.product(ACTIONS, (INSIDE, OUTSIDE), (False, True), LABELS):
            bindings = [Binding(role, covers(scope, place))]
            expected = expect(bindings, time_ == "within", action, labels, mfa)
            cases.append(Case(subject, action, place, mfa, labels, expected, f"grant:{scope}:{time_}"))

    for time_ in TIMES:
        await grant("", HOLDERS_GET, *windows[time_], HOLDERS_SCOPE, holders=HOLDERS)
    revoked_id = await grant("", HOLDERS_GET, *windows["within"], HOLDERS_SCOPE, holders=HOLDERS)
    await stub.RevokeGrant(authz_pb2.RevokeGrantRequest(caller=admin, grant_id=revoked_id, reason="matrix"))

    people = dict(STANDING) | {s: (r, None) for s, r in CLAIM_ROLES.items()}
    for subject in [*people, *(s for s in CLAIMS if s not in CLAIM_ROLES)]:
        role, department = people.get(subject, ("", None))
        scope = "department" if department else "all"
        for action, place, mfa, labels in itertools.product(ACTIONS, (INSIDE, OUTSIDE), (False, True), LABELS):
            bindings = [Binding(role, covers(scope, place))] if role else []
            if role == HOLDERS:
                bindings.append(Binding(HOLDERS_GET, covers(HOLDERS_SCOPE, place)))
            expected = expect(bindings, bool(role), action, labels, mfa)
            source = "claim" if subject in CLAIMS else "standing"
            cases.append(Case(subject, action, place, mfa, labels, expected, f"{source}:{scope}"))

    # Break-glass: three emergency physicians (role granted for the test), one without an
    # override, one with an active override on the study, one whose override was revoked.
    for state in ("none", "active", "revoked"):
        subject = f"bg.{state}"
        await grant(subject, "emergency_physician", *windows["within"])
        if state != "none":
            glass = await stub.BreakGlass(
                authz_pb2.BreakGlassRequest(caller=who(subject, True), study_instance_uid=STUDY, reason="matrix")
            )
            if state == "revoked":
                await stub.RevokeGrant(
                    authz_pb2.RevokeGrantRequest(caller=admin, grant_id=glass.grant_id, reason="matrix")
                )
        for action, place, mfa, labels in itertools.product(ACTIONS, (INSIDE, OUTSIDE), (False, True), LABELS):
            bindings = [Binding("emergency_physician", True)]
            if state == "active":
                bindings.append(Binding("emergency_reader", place is INSIDE, break_glass=True))
            expected = expect(bindings, True, action, labels, mfa)
            cases.append(Case(subject, action, place, mfa, labels, expected, f"break-glass:{state}"))

    # Let the "after" grants run out before anything is checked.
    await asyncio.sleep(max(0.0, (ends_soon - dt.datetime.now(dt.UTC)).total_seconds() + 0.5))

    window = asyncio.Semaphore(32)

    async def check(case: Case) -> authz_pb2.CheckResponse:
        resource = authz_pb2.Resource(
            type="instance",
            site="north",
            department=case.place.department,
            patient_ref=case.place.patient_ref,
            study_instance_uid=case.place.study,
            labels=list(case.labels),
        )
        request = authz_pb2.CheckRequest(subject=who(case.subject, case.mfa), action=case.action, resource=resource)
        async with window:
            reply: authz_pb2.CheckResponse = await stub.Check(request, timeout=60)
            return reply

    replies = await asyncio.gather(*(check(c) for c in cases))

    mismatches = []
    for case, reply in zip(cases, replies, strict=True):
        got = Expected(reply.allow, reply.reason_code, tuple(reply.obligations))
        if got != case.expected:
            mismatches.append((case, got))
        assert reply.reason, "every decision carries a reason"
        assert reply.subject == case.subject and reply.decision_id
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, e.g. {mismatches[:3]}"
    # The matrix really exercises every outcome.
    codes = {c.expected.code for c in cases}
    assert codes == {"granted", "no_role", "out_of_scope", "mfa_required", "unknown_subject"}
    assert any("break-glass" in c.expected.obligations for c in cases)

    events = [audit_pb2.AuditEvent.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.audit)]
    decisions = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION]
    assert len(decisions) == len(cases)
    by_id = {e.details["decision_id"]: e for e in decisions}
    assert set(by_id) == {r.decision_id for r in replies}
    success, denied = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS, audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
    for case, reply in zip(cases, replies, strict=True):
        event = by_id[reply.decision_id]
        assert event.outcome == (success if reply.allow else denied)
        assert (event.actor, event.reason, event.details["action"]) == (case.subject, reply.reason, case.action)
        assert event.details["mfa"] == str(case.mfa).lower()
        assert event.patient_ref == case.place.patient_ref and event.study_instance_uid == case.place.study
        assert event.details["department"] == case.place.department
        # Accesses under an emergency override are flagged on the trail, not only in the reply.
        assert event.details["obligations"] == ",".join(reply.obligations)
        assert event.details["token_fingerprint"] == token_fingerprint(tokens[case.subject, case.mfa])
