from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from services.authz.app import run
from services.authz.config import AuthzConfig
from services.authz.policy import (
    PolicyError,
    RequestContext,
    ResourceRef,
    RoleGrant,
    Scope,
    decide,
    load_policy,
    parse_policy,
)
from tools.stack import POLICY_FILE

POLICY = load_policy(POLICY_FILE)


@pytest.mark.parametrize(
    "subject,action,allow",
    [
        # radiologist: reads and reports images
        ("dr.house", "instance.read", True),
        ("dr.house", "study.query", True),
        ("dr.house", "instance.store", False),
        ("dr.house", "audit.read", False),
        ("dr.house", "key.rotate", False),
        ("dr.house", "grants.manage", False),
        ("dr.house", "instance.read_metadata", True),
        ("dr.house", "instance.export", True),  # to an outside consultant
        ("dr.house", "instance.delete", False),
        # referring physician: views images of their patients
        ("dr.wilson", "instance.read", True),
        ("dr.wilson", "instance.store", False),
        ("dr.wilson", "audit.verify", False),
        ("dr.wilson", "instance.read_metadata", True),
        ("dr.wilson", "instance.export", False),
        ("dr.wilson", "instance.delete", False),
        # technologist: acquires and stores, does not read
        ("tech.jane", "instance.store", True),
        ("tech.jane", "study.query", True),
        ("tech.jane", "instance.read", False),
        ("tech.jane", "audit.read", False),
        # ... but checks what was stored: headers, not images
        ("tech.jane", "instance.read_metadata", True),
        ("tech.jane", "instance.export", False),
        ("tech.jane", "instance.delete", False),
        # registrar (admin): patient administration and grants, no image viewing
        ("reg.omar", "study.query", True),
        ("reg.omar", "grants.manage", True),
        ("reg.omar", "instance.read", False),
        ("reg.omar", "instance.read_deidentified", False),
        ("reg.omar", "audit.read", False),
        ("reg.omar", "instance.read_metadata", False),
        ("reg.omar", "instance.export", False),
        ("reg.omar", "instance.delete", False),
        # auditor: the audit trail only
        ("aud.ito", "audit.read", True),
        ("aud.ito", "audit.verify", True),
        ("aud.ito", "instance.read", False),
        ("aud.ito", "instance.read_deidentified", False),
        ("aud.ito", "key.rotate", False),
        # researcher: de-identified data only
        ("res.rao", "instance.read", False),
        ("res.rao", "instance.read_deidentified", True),
        ("res.rao", "study.query", True),
        ("res.rao", "instance.store", False),
        ("res.rao", "audit.read", False),
        ("res.rao", "emergency.access", False),
        ("res.rao", "instance.read_metadata", False),  # identified headers: no
        ("res.rao", "instance.export", False),
        # key custodian
        ("sec.kim", "key.rotate", True),
        ("sec.kim", "instance.read", False),
        # privacy officer: erasure and data-subject access requests (export), no viewing
        ("dpo.lee", "patient.erase", True),
        ("dpo.lee", "instance.export", True),
        ("dpo.lee", "instance.read", False),
        ("dpo.lee", "instance.delete", False),
        # PACS administrator: corrects mis-filed studies, does not view them
        ("pacs.ana", "instance.delete", True),
        ("pacs.ana", "instance.read_metadata", True),
        ("pacs.ana", "study.query", True),
        ("pacs.ana", "instance.read", False),
        ("pacs.ana", "instance.export", False),
        ("pacs.ana", "patient.erase", False),
        # service accounts: exactly their pipeline step
        ("svc-ingest", "instance.store", True),
        ("svc-ingest", "instance.read", False),
        ("svc-ingest", "audit.read", False),
        ("svc-ingest", "instance.delete", False),
        ("svc-gateway", "study.query", True),
        ("svc-gateway", "instance.read", False),
        ("svc-gateway", "instance.store", False),
        ("svc-gateway", "instance.read_metadata", False),
    ],
)
def test_decision_table(subject: str, action: str, allow: bool) -> None:
    decision = decide(POLICY, subject, action)
    assert decision.allow is allow
    assert decision.policy_version == POLICY.version == "2026-12-07.1"
    assert decision.code == ("granted" if allow else "no_role")
    assert decision.roles == POLICY.subjects[subject]


def test_no_role_but_the_researcher_s_reads_identified_data() -> None:
    """Structural guard on the shipped file: identified reads never reach the researcher role."""
    assert "instance.read" not in POLICY.roles["researcher"].actions
    assert POLICY.roles["researcher"].obligations == {
        "instance.read_deidentified": ("deidentify",),
        "study.query": ("deidentify",),
    }
    # Whatever the resource or context, the researcher stays refused identified reads.
    for labels in (frozenset(), frozenset({"vip"})):
        for ctx in (RequestContext(), RequestContext(purpose="research", mfa=True)):
            assert not decide(POLICY, "res.rao", "instance.read", ResourceRef("instance", labels=labels), ctx).allow


@pytest.mark.parametrize(
    "subject,action,code,reason",
    [
        ("mallory", "instance.read", "unknown_subject", "unknown subject"),
        ("dr.house", "instance.purge", "unknown_action", "unknown action instance.purge"),
        ("mallory", "instance.purge", "unknown_action", "unknown action instance.purge"),
        ("", "instance.read", "no_subject", "no subject"),
        ("dr.house", "", "no_action", "no action"),
        ("", "", "no_subject", "no subject"),
        ("res.rao", "instance.read", "no_role", "no role of the subject grants instance.read"),
        ("tech.jane", "instance.read", "no_role", "no role of the subject grants instance.read"),
    ],
)
def test_deny_by_default_with_stable_reasons(subject: str, action: str, code: str, reason: str) -> None:
    decision = decide(POLICY, subject, action, ResourceRef("instance", "1.2.3", "ab" * 16), RequestContext("treatment"))
    assert not decision.allow
    assert (decision.code, decision.reason) == (code, reason)
    assert decision.obligations == ()
    assert decision.policy_version == POLICY.version
    # Reasons name the rule, never the resource: no study or object id leaks into them.
    assert "1.2.3" not in decision.reason and "abab" not in decision.reason


def test_deny_names_the_subject_s_roles() -> None:
    denied = decide(POLICY, "res.rao", "instance.read")
    assert denied.roles == ("researcher",)
    assert decide(POLICY, "mallory", "instance.read").roles == ()


def test_granted_roles_add_access_only_for_defined_roles() -> None:
    """Grants (a later source of roles) slot in through the context, never bypassing the role table."""
    radiologist = (RoleGrant("radiologist"),)
    locum = decide(POLICY, "dr.locum", "instance.read", context=RequestContext(grants=radiologist))
    assert locum.allow and locum.roles == ("radiologist",)
    ghost = decide(POLICY, "dr.locum", "instance.read", context=RequestContext(grants=(RoleGrant("superuser"),)))
    assert not ghost.allow and ghost.code == "unknown_subject"
    both = decide(POLICY, "tech.jane", "instance.read", context=RequestContext(grants=radiologist))
    assert both.allow and both.roles == ("technologist", "radiologist")


NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
REF = "0123456789abcdef" * 2
IN_CARDIOLOGY = ResourceRef("instance", "1.2.3", labels=frozenset(), site="north", department="cardiology")


@pytest.mark.parametrize(
    "scope,resource,allow",
    [
        (Scope(), ResourceRef("instance"), True),
        (Scope(department="cardiology"), IN_CARDIOLOGY, True),
        (Scope(department="cardiology"), ResourceRef("instance", department="oncology"), False),
        # A resource that does not say where it belongs is outside every placed scope.
        (Scope(department="cardiology"), ResourceRef("instance"), False),
        (Scope(site="north"), IN_CARDIOLOGY, True),
        (Scope(site="south", department="cardiology"), IN_CARDIOLOGY, False),
        (Scope(patient_ref=REF), ResourceRef("instance", "9.9", patient_ref=REF), True),
        (Scope(patient_ref=REF), ResourceRef("instance", "9.9", patient_ref="f" * 32), False),
        (Scope(study_instance_uid="1.2.3"), IN_CARDIOLOGY, True),
        (Scope(study_instance_uid="1.2.4"), IN_CARDIOLOGY, False),
    ],
)
def test_grants_apply_within_their_scope(scope: Scope, resource: ResourceRef, allow: bool) -> None:
    ctx = RequestContext(grants=(RoleGrant("radiologist", scope, NOW - HOUR, NOW + HOUR),), at=NOW)
    decision = decide(POLICY, "dr.locum", "instance.read", resource, ctx)
    assert decision.allow is allow
    assert decision.code == ("granted" if allow else "out_of_scope")
    # A study query is not the radiologist grant's business outside its scope either.
    assert decide(POLICY, "dr.locum", "study.query", resource, ctx).allow is allow


@pytest.mark.parametrize(
    "at,allow", [(NOW - 2 * HOUR, False), (NOW - HOUR, True), (NOW, True), (NOW + HOUR, False), (None, False)]
)
def test_grants_apply_only_within_their_window(at: dt.datetime | None, allow: bool) -> None:
    ctx = RequestContext(grants=(RoleGrant("radiologist", Scope(), NOW - HOUR, NOW + HOUR),), at=at)
    decision = decide(POLICY, "dr.locum", "instance.read", ResourceRef("instance"), ctx)
    assert (decision.allow, decision.code) == (allow, "granted" if allow else "unknown_subject")


def test_department_bound_subject() -> None:
    assert POLICY.subject_scopes["dr.cameron"] == (Scope(department="cardiology"),)
    assert decide(POLICY, "dr.cameron", "instance.read", IN_CARDIOLOGY).allow
    elsewhere = decide(POLICY, "dr.cameron", "instance.read", ResourceRef("instance", department="oncology"))
    assert (elsewhere.allow, elsewhere.code, elsewhere.roles) == (False, "out_of_scope", ())
    assert elsewhere.reason == "no role of the subject grants instance.read on this resource"
    assert decide(POLICY, "dr.cameron", "key.rotate", IN_CARDIOLOGY).code == "no_role"


def test_only_break_glass_access_is_flagged() -> None:
    glass = RoleGrant("emergency_reader", Scope(study_instance_uid="1.2.3"), NOW - HOUR, NOW + HOUR, break_glass=True)
    ctx = RequestContext(grants=(glass,), at=NOW)
    flagged = decide(POLICY, "dr.er", "instance.read", IN_CARDIOLOGY, ctx)
    assert flagged.allow and flagged.obligations == ("break-glass",)
    assert flagged.roles == ("emergency_physician", "emergency_reader")
    # The standing role suffices for a query: no flag.
    assert decide(POLICY, "dr.er", "study.query", IN_CARDIOLOGY, ctx).obligations == ()
    assert not decide(POLICY, "dr.er", "instance.read", ResourceRef("instance", "1.2.4"), ctx).allow
    # A radiologist with an override is not flagged for what their own role allows.
    assert decide(POLICY, "dr.house", "instance.read", IN_CARDIOLOGY, ctx).obligations == ()


def test_researcher_gets_deidentification_obligation() -> None:
    decision = decide(POLICY, "res.rao", "instance.read_deidentified")
    assert decision.allow
    assert decision.obligations == ("deidentify",)
    assert decision.reason == "granted by role researcher"
    assert decide(POLICY, "dr.house", "instance.read").obligations == ()


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "1",
        "actions": {"instance.read": "read"},
        "roles": {"radiologist": {"actions": ["instance.read"]}},
        "subjects": {"a": {"roles": ["radiologist"]}},
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    "doc,message",
    [
        (_doc(version=""), "version must be a non-empty string"),
        (_doc(extra=1), "unknown key(s) extra"),
        (_doc(actions={}), "at least one action"),
        (_doc(roles={"r": {"actions": ["nope"]}}), "action 'nope' is not declared"),
        (_doc(roles={"r": {"actions": ["instance.read"], "colour": "red"}}), "roles.r: unknown key(s) colour"),
        (_doc(subjects={"a": {"roles": ["ghost"]}}), "role 'ghost' is not defined"),
        (_doc(subjects={"a": {"roles": "radiologist"}}), "must be a list of non-empty strings"),
        (
            _doc(roles={"r": {"actions": ["instance.read"], "obligations": {"instance.store": ["x"]}}}),
            "is not one of the role's actions",
        ),
        (_doc(version="   "), "version must be a non-empty string"),
        (_doc(version=3), "version must be a non-empty string"),
        ({k: v for k, v in _doc().items() if k != "version"}, "version must be a non-empty string"),
        (_doc(subjects={"a": {"roles": ["radiologist"], "password": "x"}}), "subjects.a: unknown key(s) password"),
        (_doc(roles={"r": "instance.read"}), "roles.r must be a table"),
        (_doc(break_glass={"role": "ghost"}), "break_glass: role 'ghost' is not defined"),
        (_doc(break_glass={"role": "radiologist", "minutes": 0}), "break_glass.minutes must be an integer"),
        (_doc(sensitivity={"mfa_required": ["vip"], "colour": 1}), "sensitivity: unknown key(s) colour"),
        (_doc(subjects={"a": {"roles": ["radiologist"], "scopes": []}}), "must be a non-empty list"),
        (
            _doc(subjects={"a": {"roles": ["radiologist"], "scopes": [{"patient_ref": "ab"}]}}),
            "unknown key(s) patient_ref",
        ),
        (_doc(subjects={"a": {"roles": ["radiologist"], "scopes": [{"department": ""}]}}), "non-empty site and/or"),
    ],
)
def test_malformed_policies_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert message in str(info.value)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("version = ", encoding="utf-8")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(bad)


def test_sensitive_resources_require_mfa() -> None:
    assert POLICY.mfa_labels == {"vip", "mental_health", "restricted"}
    vip = ResourceRef("instance", labels=frozenset({"vip"}))
    denied = decide(POLICY, "dr.house", "instance.read", vip, RequestContext(mfa=False))
    assert not denied.allow
    assert (denied.code, denied.reason) == ("mfa_required", "mfa required for vip resources")
    assert denied.obligations == ("mfa-required",)
    assert decide(POLICY, "dr.house", "instance.read", vip, RequestContext(mfa=True)).allow
    oncology = ResourceRef("instance", labels=frozenset({"oncology"}))
    assert decide(POLICY, "dr.house", "instance.read", oncology, RequestContext(mfa=False)).allow
    # MFA never widens a role: a researcher stays refused identified reads.
    assert not decide(POLICY, "res.rao", "instance.read", vip, RequestContext(mfa=True)).allow


async def test_service_refuses_to_start_on_a_bad_policy(tmp_path: Path) -> None:
    """The policy is checked before anything else starts: no port bound, no Kafka contacted."""
    bad = tmp_path / "policy.toml"
    bad.write_text(
        'version = "1"\n[actions]\n"instance.read" = "read"\n[subjects.a]\nroles = ["radiologist"]\n', encoding="utf-8"
    )
    cfg = AuthzConfig("127.0.0.1:0", bad, "127.0.0.1:1", "")
    with pytest.raises(PolicyError, match=r"subjects\.a: role 'radiologist' is not defined"):
        await run(cfg, asyncio.Event())


# -- roles from the identity provider's claims -------------------------------------------------


def test_shipped_identity_mapping() -> None:
    assert POLICY.identity.roles_claim == "groups"
    assert POLICY.identity.role_map["/radiology/consultants"] == (RoleGrant("radiologist"),)
    assert POLICY.identity.role_map["/cardiology/referrers"] == (
        RoleGrant("referring_physician", Scope(department="cardiology")),
    )


def test_claim_values_confer_only_mapped_roles() -> None:
    consultant = RequestContext(claim_values=("/radiology/consultants",))
    allowed = decide(POLICY, "kc-7f3a", "instance.read", ResourceRef("instance"), consultant)
    assert (allowed.allow, allowed.roles) == (True, ("radiologist",))
    # Values nobody mapped grant nothing: an unknown group is no role at all.
    stranger = RequestContext(claim_values=("/radiology/everyone", "admin", "radiologist"))
    denied = decide(POLICY, "kc-7f3a", "instance.read", ResourceRef("instance"), stranger)
    assert (denied.allow, denied.code) == (False, "unknown_subject")
    # The mapping keeps its scope: cardiology referrers read cardiology only.
    referrer = RequestContext(claim_values=("/cardiology/referrers",))
    assert decide(POLICY, "kc-7f3a", "instance.read", IN_CARDIOLOGY, referrer).allow
    oncology = ResourceRef("instance", department="oncology")
    assert decide(POLICY, "kc-7f3a", "instance.read", oncology, referrer).code == "out_of_scope"


def test_claims_add_to_the_subjects_table() -> None:
    both = RequestContext(claim_values=("/radiography/staff", "/cardiology/referrers"))
    jane = decide(POLICY, "dr.cameron", "instance.store", ResourceRef("instance"), both)
    assert jane.allow and set(jane.roles) == {"technologist"}  # out of cardiology only the claim role counts
    in_cardiology = decide(POLICY, "dr.cameron", "instance.read", IN_CARDIOLOGY, both)
    assert in_cardiology.allow and in_cardiology.roles == ("referring_physician", "technologist")
    # Without claims, the file's bindings alone.
    assert not decide(POLICY, "dr.cameron", "instance.store", ResourceRef("instance")).allow
    assert POLICY.held_roles("dr.cameron", ("/radiography/staff",)) == {"referring_physician", "technologist"}


def _identity_doc(identity: dict[str, Any]) -> dict[str, Any]:
    return _doc(
        roles={"radiologist": {"actions": ["instance.read"]}, "reader": {"actions": ["instance.read"]}},
        break_glass={"role": "reader"},
        identity=identity,
    )


def test_identity_mapping_forms() -> None:
    policy = parse_policy(
        _identity_doc(
            {
                "roles_claim": "realm_access.roles",
                "role_map": {
                    "rad": ["radiologist"],
                    "rad-north": {"roles": ["radiologist"], "scopes": [{"site": "north"}, {"department": "ed"}]},
                },
            }
        )
    )
    assert policy.identity.roles_claim == "realm_access.roles"
    assert policy.identity.role_map["rad"] == (RoleGrant("radiologist"),)
    assert policy.identity.role_map["rad-north"] == (
        RoleGrant("radiologist", Scope(site="north")),
        RoleGrant("radiologist", Scope(department="ed")),
    )
    # No [identity] at all: no claim is read, nothing is mapped.
    assert parse_policy(_doc()).identity.roles_claim == ""


@pytest.mark.parametrize(
    "identity,message",
    [
        ({"roles_claim": ""}, "identity.roles_claim must be a non-empty string"),
        ({"roles_claim": 7}, "identity.roles_claim must be a non-empty string"),
        ({"role_map": {"rad": ["radiologist"]}}, "identity.role_map needs identity.roles_claim"),
        ({"roles_claim": "groups", "colour": 1}, "identity: unknown key(s) colour"),
        (
            {"roles_claim": "groups", "role_map": {"rad": ["ghost"]}},
            "identity.role_map.'rad': role 'ghost' is not defined",
        ),
        ({"roles_claim": "groups", "role_map": {"rad": []}}, "identity.role_map.'rad' must name at least one role"),
        ({"roles_claim": "groups", "role_map": {"rad": "radiologist"}}, "must be a list of non-empty strings"),
        ({"roles_claim": "groups", "role_map": {"rad": {"scopes": [{"site": "n"}]}}}, "'rad'.roles must be a list"),
        (
            {"roles_claim": "groups", "role_map": {"rad": {"roles": ["radiologist"], "until": "friday"}}},
            "identity.role_map.'rad': unknown key(s) until",
        ),
        (
            {"roles_claim": "groups", "role_map": {"rad": {"roles": ["radiologist"], "scopes": [{"study": "1.2"}]}}},
            "unknown key(s) study",
        ),
        ({"roles_claim": "groups", "role_map": {" ": ["radiologist"]}}, "a claim value must be a non-empty string"),
        ({"roles_claim": "groups", "role_map": {"er": ["reader"]}}, "role 'reader' is conferred only by break-glass"),
        ({"roles_claim": "groups", "role_map": ["radiologist"]}, "identity.role_map must be a table"),
    ],
)
def test_bad_identity_mappings_are_refused(identity: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(_identity_doc(identity))
    assert message in str(info.value)


async def test_service_refuses_to_start_on_a_bad_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text(
        POLICY_FILE.read_text(encoding="utf-8").replace(
            '"/radiography/staff" = ["technologist"]', '"/radiography/staff" = ["radiographer"]'
        ),
        encoding="utf-8",
    )
    cfg = AuthzConfig("127.0.0.1:0", bad, "127.0.0.1:1", "")
    with pytest.raises(PolicyError, match=r"identity\.role_map\.'/radiography/staff': role 'radiographer'"):
        await run(cfg, asyncio.Event())


# -- grants to every holder of a role ----------------------------------------------------------


def _to_holders(holder: str, start: dt.datetime = NOW - HOUR, end: dt.datetime = NOW + HOUR) -> RoleGrant:
    return RoleGrant("referring_physician", Scope(department="cardiology"), start, end, holder_role=holder)


@pytest.mark.parametrize(
    "subject,claims,at,resource,allow,code",
    [
        # holders of emergency_physician: from the subjects table (dr.er) or from a mapped claim
        ("dr.er", (), NOW, IN_CARDIOLOGY, True, "granted"),
        ("kc-9", ("/emergency/physicians",), NOW, IN_CARDIOLOGY, True, "granted"),
        # before and after the window
        ("dr.er", (), NOW - 2 * HOUR, IN_CARDIOLOGY, False, "no_role"),
        ("dr.er", (), NOW + HOUR, IN_CARDIOLOGY, False, "no_role"),
        # out of the grant's scope
        ("dr.er", (), NOW, ResourceRef("instance", department="oncology"), False, "out_of_scope"),
        # not a holder: other roles, unknown claims, an unknown subject
        ("tech.jane", (), NOW, IN_CARDIOLOGY, False, "no_role"),
        ("kc-9", ("/emergency/visitors",), NOW, IN_CARDIOLOGY, False, "unknown_subject"),
        ("dr.locum", (), NOW, IN_CARDIOLOGY, False, "unknown_subject"),
    ],
)
def test_grants_to_role_holders(
    subject: str, claims: tuple[str, ...], at: dt.datetime, resource: ResourceRef, allow: bool, code: str
) -> None:
    ctx = RequestContext(grants=(_to_holders("emergency_physician"),), at=at, claim_values=claims)
    decision = decide(POLICY, subject, "instance.read", resource, ctx)
    assert (decision.allow, decision.code) == (allow, code)


def test_a_role_conferred_by_a_grant_makes_no_holder() -> None:
    """Holding a role through another grant does not count: a grant's reach stays what it says."""
    personal = RoleGrant("emergency_physician", Scope(), NOW - HOUR, NOW + HOUR)
    ctx = RequestContext(grants=(personal, _to_holders("emergency_physician")), at=NOW)
    decision = decide(POLICY, "dr.locum", "instance.read", IN_CARDIOLOGY, ctx)
    assert (decision.allow, decision.code, decision.roles) == (False, "no_role", ("emergency_physician",))


def test_every_reader_reads_metadata_and_few_export_or_delete() -> None:
    """Structural guards on the shipped file: a viewer fetches headers before pixels, so every
    role that reads identified instances reads their metadata; identified data leaves, or is
    deleted, only through the roles a hospital gives that to."""
    readers = {name for name, role in POLICY.roles.items() if "instance.read" in role.actions}
    with_metadata = {name for name, role in POLICY.roles.items() if "instance.read_metadata" in role.actions}
    assert readers <= with_metadata
    assert with_metadata - readers == {"technologist", "pacs_admin"}
    exporters = {name for name, role in POLICY.roles.items() if "instance.export" in role.actions}
    assert exporters == {"radiologist", "privacy_officer"}
    assert {name for name, role in POLICY.roles.items() if "instance.delete" in role.actions} == {"pacs_admin"}
    # Break-glass reads one study, metadata included; never exports or deletes.
    assert POLICY.roles["emergency_reader"].actions == {"instance.read", "instance.read_metadata"}


@pytest.mark.parametrize("action", ["instance.read_metadata", "instance.export", "instance.delete"])
def test_new_actions_follow_scope_and_mfa(action: str) -> None:
    """Nothing special about the newer actions: scopes and sensitivity narrow them like any other."""
    holder = {
        "instance.read_metadata": "radiologist",
        "instance.export": "radiologist",
        "instance.delete": "pacs_admin",
    }
    ctx = RequestContext(
        grants=(RoleGrant(holder[action], Scope(department="cardiology"), NOW - HOUR, NOW + HOUR),), at=NOW
    )
    assert decide(POLICY, "dr.locum", action, IN_CARDIOLOGY, ctx).allow
    oncology = ResourceRef("instance", department="oncology")
    assert decide(POLICY, "dr.locum", action, oncology, ctx).code == "out_of_scope"
    vip = ResourceRef("instance", labels=frozenset({"vip"}), department="cardiology")
    assert decide(POLICY, "dr.locum", action, vip, ctx).code == "mfa_required"
    assert decide(POLICY, "dr.locum", action, vip, RequestContext(mfa=True, grants=ctx.grants, at=NOW)).allow
