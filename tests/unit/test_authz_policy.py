from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.authz.policy import PolicyError, decide, load_policy, parse_policy

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deploy" / "policy" / "policy.toml")


@pytest.mark.parametrize(
    "subject,action,allow",
    [
        ("dr.house", "instance.read", True),
        ("dr.wilson", "instance.read", True),
        ("tech.jane", "instance.store", True),
        ("tech.jane", "instance.read", False),
        ("reg.omar", "instance.read", False),
        ("reg.omar", "study.query", True),
        ("aud.ito", "audit.verify", True),
        ("aud.ito", "instance.read", False),
        ("res.rao", "instance.read", False),
        ("res.rao", "instance.read_deidentified", True),
        ("sec.kim", "key.rotate", True),
        ("dr.house", "key.rotate", False),
        ("svc-gateway", "instance.read", False),
    ],
)
def test_decision_table(subject: str, action: str, allow: bool) -> None:
    assert decide(POLICY, subject, action).allow is allow


def test_deny_by_default_with_specific_reasons() -> None:
    assert decide(POLICY, "mallory", "instance.read").reason == "unknown subject"
    assert decide(POLICY, "dr.house", "instance.delete").reason == "unknown action instance.delete"
    assert decide(POLICY, "", "instance.read").reason == "no subject"
    assert decide(POLICY, "dr.house", "").reason == "no action"
    denied = decide(POLICY, "res.rao", "instance.read")
    assert denied.reason == "no role of the subject grants instance.read"
    assert denied.roles == ("researcher",)


def test_researcher_gets_deidentification_obligation() -> None:
    decision = decide(POLICY, "res.rao", "instance.read_deidentified")
    assert decision.allow
    assert decision.obligations == ("deidentify",)
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
    denied = decide(POLICY, "dr.house", "instance.read", labels=["vip"], mfa=False)
    assert not denied.allow
    assert denied.reason == "mfa required for vip resources"
    assert denied.obligations == ("mfa-required",)
    assert decide(POLICY, "dr.house", "instance.read", labels=["vip"], mfa=True).allow
    assert decide(POLICY, "dr.house", "instance.read", labels=["oncology"], mfa=False).allow
    # MFA never widens a role: a researcher stays refused identified reads.
    assert not decide(POLICY, "res.rao", "instance.read", labels=["vip"], mfa=True).allow
