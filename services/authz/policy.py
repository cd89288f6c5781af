"""The policy model and the decision function. Pure: no I/O besides loading the file.

A decision allows an action only when one of the subject's roles lists it; everything else
— unknown subject, unknown action, empty request — is denied with a reason that names the
rule, never a patient fact.

Inputs are split so later sources of authority slot in without changing the rules: roles →
actions is the policy, subject → roles comes from the policy's subjects table *plus* the
roles of grants in force (``RequestContext.granted_roles``), and facts established by the
caller's authentication (``RequestContext.mfa``) or the resource (``ResourceRef.labels``)
only ever narrow what the roles allow.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PolicyError(ValueError):
    """The policy file is malformed; the service refuses to start with it."""


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    actions: frozenset[str]
    obligations: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    version: str
    actions: Mapping[str, str]
    roles: Mapping[str, Role]
    subjects: Mapping[str, tuple[str, ...]]
    mfa_labels: frozenset[str] = frozenset()
    break_glass_role: str = ""
    break_glass_minutes: int = 30


@dataclass(frozen=True)
class ResourceRef:
    """What is accessed: identifiers and sensitivity labels only, never patient facts."""

    type: str = ""
    study_instance_uid: str = ""
    object_id: str = ""
    labels: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RequestContext:
    """Facts about the request established by the caller of ``decide`` (never PHI).

    ``mfa``: the session was authenticated with a second factor (from a verified token).
    ``granted_roles``: roles of grants in force now for this subject and resource.
    ``purpose``: stated purpose of use (recorded, not decisive yet).
    """

    purpose: str = ""
    mfa: bool = False
    granted_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    allow: bool
    # For people; stable and PHI-free (see the service README for the list).
    reason: str
    roles: tuple[str, ...] = ()
    obligations: tuple[str, ...] = ()
    policy_version: str = ""
    # Machine-readable, from a fixed set (safe as a metric label): granted, no_subject,
    # no_action, unknown_action, unknown_subject, no_role, mfa_required, ...
    code: str = ""


_TOP_KEYS = {"version", "actions", "roles", "subjects", "sensitivity", "break_glass"}
_BREAK_GLASS_KEYS = {"role", "minutes"}
_SENSITIVITY_KEYS = {"mfa_required"}
_ROLE_KEYS = {"description", "actions", "obligations"}
_SUBJECT_KEYS = {"roles"}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a table")
    return value


def _unknown(keys: set[str], allowed: set[str], where: str) -> None:
    extra = sorted(keys - allowed)
    if extra:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(extra)}")


def parse_policy(doc: Mapping[str, Any]) -> Policy:
    _unknown(set(doc), _TOP_KEYS, "policy")
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError("policy: version must be a non-empty string")
    actions = {str(k): str(v) for k, v in _table(doc.get("actions", {}), "actions").items()}
    if not actions:
        raise PolicyError("actions: at least one action must be declared")
    roles: dict[str, Role] = {}
    for name, raw in _table(doc.get("roles", {}), "roles").items():
        body = _table(raw, f"roles.{name}")
        _unknown(set(body), _ROLE_KEYS, f"roles.{name}")
        granted = _strings(body.get("actions", []), f"roles.{name}.actions")
        for action in granted:
            if action not in actions:
                raise PolicyError(f"roles.{name}: action {action!r} is not declared in [actions]")
        obligations: dict[str, tuple[str, ...]] = {}
        for action, duties in _table(body.get("obligations", {}), f"roles.{name}.obligations").items():
            if action not in granted:
                raise PolicyError(f"roles.{name}.obligations: {action!r} is not one of the role's actions")
            obligations[action] = _strings(duties, f"roles.{name}.obligations.{action}")
        roles[name] = Role(name, str(body.get("description", "")), frozenset(granted), obligations)
    subjects: dict[str, tuple[str, ...]] = {}
    for subject, raw in _table(doc.get("subjects", {}), "subjects").items():
        body = _table(raw, f"subjects.{subject}")
        _unknown(set(body), _SUBJECT_KEYS, f"subjects.{subject}")
        assigned = _strings(body.get("roles", []), f"subjects.{subject}.roles")
        for role in assigned:
            if role not in roles:
                raise PolicyError(f"subjects.{subject}: role {role!r} is not defined")
        subjects[subject] = assigned
    sensitivity = _table(doc.get("sensitivity", {}), "sensitivity")
    _unknown(set(sensitivity), _SENSITIVITY_KEYS, "sensitivity")
    mfa_labels = frozenset(_strings(sensitivity.get("mfa_required", []), "sensitivity.mfa_required"))
    glass = _table(doc.get("break_glass", {}), "break_glass")
    _unknown(set(glass), _BREAK_GLASS_KEYS, "break_glass")
    glass_role = str(glass.get("role", ""))
    if glass_role and glass_role not in roles:
        raise PolicyError(f"break_glass: role {glass_role!r} is not defined")
    minutes = glass.get("minutes", 30)
    if not isinstance(minutes, int) or not 1 <= minutes <= 240:
        raise PolicyError("break_glass.minutes must be an integer in 1..240")
    return Policy(version.strip(), actions, roles, subjects, mfa_labels, glass_role, minutes)


def load_policy(path: Path) -> Policy:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    return parse_policy(doc)


def decide(
    policy: Policy,
    subject_id: str,
    action: str,
    resource: ResourceRef | None = None,
    context: RequestContext | None = None,
) -> Decision:
    """Deny by default: allow only when a role of the subject lists ``action``."""
    resource = resource or ResourceRef()
    context = context or RequestContext()

    def deny(code: str, reason: str, roles: tuple[str, ...] = (), obligations: tuple[str, ...] = ()) -> Decision:
        return Decision(False, reason, roles, obligations, policy.version, code)

    if not subject_id:
        return deny("no_subject", "no subject")
    if not action:
        return deny("no_action", "no action")
    if action not in policy.actions:
        return deny("unknown_action", f"unknown action {action}")
    extra = tuple(r for r in context.granted_roles if r in policy.roles)
    listed = policy.subjects.get(subject_id)
    if listed is None and not extra:
        return deny("unknown_subject", "unknown subject")
    roles = tuple(dict.fromkeys((*(listed or ()), *extra)))
    granting = [policy.roles[r] for r in roles if action in policy.roles[r].actions]
    if not granting:
        return deny("no_role", f"no role of the subject grants {action}", roles)
    sensitive = sorted(policy.mfa_labels.intersection(resource.labels))
    if sensitive and not context.mfa:
        # Machine-readable for the client: ask the user to step up, then retry.
        return deny("mfa_required", f"mfa required for {', '.join(sensitive)} resources", roles, ("mfa-required",))
    duties = tuple(sorted({d for role in granting for d in role.obligations.get(action, ())}))
    return Decision(True, f"granted by role {granting[0].name}", roles, duties, policy.version, "granted")
