"""The policy model and the decision function. Pure: no I/O besides loading the file.

A decision allows an action only when one of the subject's roles lists it; everything else
— unknown subject, unknown action, empty request — is denied with a reason that names the
rule, never a patient fact.

Inputs are split so further sources of authority slot in without changing the rules: roles →
actions is the policy; subject → roles comes from the policy's subjects table, the identity
provider's role/group claim of the verified token mapped through ``[identity.role_map]``
(``RequestContext.claim_values``), and the grants of the request context
(``RequestContext.grants``: the subject's own and those to holders of one of its roles).
Every binding of a role carries a ``Scope`` (all, site, department, patient, study) and grants
a validity window; only the bindings in force that cover the resource count. Facts established
by the caller's authentication (``RequestContext.mfa``) or the resource (``ResourceRef.labels``)
only ever narrow what the roles allow.
"""

from __future__ import annotations

import datetime as dt
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
class ResourceRef:
    """What is accessed: identifiers, placement and sensitivity labels, never patient facts
    (``patient_ref`` is a keyed pseudonym)."""

    type: str = ""
    study_instance_uid: str = ""
    object_id: str = ""
    labels: frozenset[str] = frozenset()
    site: str = ""
    department: str = ""
    patient_ref: str = ""


@dataclass(frozen=True)
class Scope:
    """Where a role binding applies: every field that is set must equal the resource's.

    All fields empty = every resource. A resource that does not state a field is never
    covered by a scope that constrains it (deny by default).
    """

    site: str = ""
    department: str = ""
    patient_ref: str = ""
    study_instance_uid: str = ""

    def covers(self, resource: ResourceRef) -> bool:
        return all(
            not wanted or wanted == actual
            for wanted, actual in (
                (self.site, resource.site),
                (self.department, resource.department),
                (self.patient_ref, resource.patient_ref),
                (self.study_instance_uid, resource.study_instance_uid),
            )
        )

    @property
    def kind(self) -> str:
        """The narrowest constraint, for audit details and metrics: all, site, department, patient, study."""
        for name, value in (
            ("study", self.study_instance_uid),
            ("patient", self.patient_ref),
            ("department", self.department),
            ("site", self.site),
        ):
            if value:
                return name
        return "all"


EVERYWHERE = Scope()


@dataclass(frozen=True)
class RoleGrant:
    """A role bound to a subject for a scope, optionally only between ``not_before`` and
    ``not_after`` (a time-limited or break-glass grant)."""

    role: str
    scope: Scope = EVERYWHERE
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    break_glass: bool = False
    # Set on a grant to every holder of this role (from the policy's subjects table or the
    # token's claims, never from another grant): it counts only for subjects holding it.
    holder_role: str = ""

    def in_force(self, at: dt.datetime | None) -> bool:
        if self.not_before is None and self.not_after is None:
            return True
        if at is None:  # a time-limited grant without a clock proves nothing
            return False
        return (self.not_before is None or self.not_before <= at) and (self.not_after is None or at < self.not_after)


@dataclass(frozen=True)
class IdentityMapping:
    """Which claim of a verified access token carries the identity provider's groups or roles,
    and which policy roles (with scopes) each value confers. Values not listed confer nothing."""

    roles_claim: str = ""
    role_map: Mapping[str, tuple[RoleGrant, ...]] = field(default_factory=dict)

    def bindings(self, claim_values: tuple[str, ...]) -> tuple[RoleGrant, ...]:
        return tuple(b for value in dict.fromkeys(claim_values) for b in self.role_map.get(value, ()))


@dataclass(frozen=True)
class Policy:
    version: str
    actions: Mapping[str, str]
    roles: Mapping[str, Role]
    subjects: Mapping[str, tuple[str, ...]]
    mfa_labels: frozenset[str] = frozenset()
    break_glass_role: str = ""
    break_glass_minutes: int = 30
    # Subjects whose standing roles apply only within these sites/departments (absent = everywhere).
    subject_scopes: Mapping[str, tuple[Scope, ...]] = field(default_factory=dict)
    identity: IdentityMapping = field(default_factory=IdentityMapping)

    def bindings(self, subject: str, claim_values: tuple[str, ...] = ()) -> tuple[RoleGrant, ...]:
        """Standing bindings: the subjects table, then the token's mapped claim values."""
        scopes = self.subject_scopes.get(subject) or (EVERYWHERE,)
        own = tuple(RoleGrant(role, scope) for role in self.subjects.get(subject, ()) for scope in scopes)
        return own + self.identity.bindings(claim_values)

    def held_roles(self, subject: str, claim_values: tuple[str, ...] = ()) -> frozenset[str]:
        """The roles whose holders' grants apply to the subject (any scope of the role counts)."""
        return frozenset(b.role for b in self.bindings(subject, claim_values))


@dataclass(frozen=True)
class RequestContext:
    """Facts about the request established by the caller of ``decide`` (never PHI).

    ``mfa``: the session was authenticated with a second factor (from a verified token).
    ``claim_values``: the values of the policy's ``roles_claim`` in the *verified* access token
    (empty without one: a development-mode subject id never carries claims).
    ``grants``: the subject's grants and those to holders of its roles, from the grant store
    (``decide`` checks holder, window and scope).
    ``at``: the time of the decision, against which grant windows are checked.
    ``purpose``: stated purpose of use (recorded, not decisive yet).
    """

    purpose: str = ""
    mfa: bool = False
    grants: tuple[RoleGrant, ...] = ()
    at: dt.datetime | None = None
    claim_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    allow: bool
    # For people; stable and PHI-free (see the service README for the list).
    reason: str
    roles: tuple[str, ...] = ()
    obligations: tuple[str, ...] = ()
    policy_version: str = ""
    # Machine-readable, from a fixed set (safe as a metric label): granted, no_subject,
    # no_action, unknown_action, unknown_subject, no_role, out_of_scope, mfa_required, ...
    code: str = ""


_TOP_KEYS = {"version", "actions", "roles", "subjects", "sensitivity", "break_glass", "identity"}
_IDENTITY_KEYS = {"roles_claim", "role_map"}
_ROLE_MAP_KEYS = {"roles", "scopes"}
_BREAK_GLASS_KEYS = {"role", "minutes"}
_SENSITIVITY_KEYS = {"mfa_required"}
_ROLE_KEYS = {"description", "actions", "obligations"}
_SUBJECT_KEYS = {"roles", "scopes"}
# Standing bindings in the file are placed by site/department; patient and study scopes are
# per-person, time-limited grants in the grant store.
_SCOPE_KEYS = {"site", "department"}


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
    subject_scopes: dict[str, tuple[Scope, ...]] = {}
    for subject, raw in _table(doc.get("subjects", {}), "subjects").items():
        body = _table(raw, f"subjects.{subject}")
        _unknown(set(body), _SUBJECT_KEYS, f"subjects.{subject}")
        assigned = _strings(body.get("roles", []), f"subjects.{subject}.roles")
        for role in assigned:
            if role not in roles:
                raise PolicyError(f"subjects.{subject}: role {role!r} is not defined")
        subjects[subject] = assigned
        if "scopes" in body:
            subject_scopes[subject] = _scopes(body["scopes"], f"subjects.{subject}.scopes")
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
    identity = _identity(_table(doc.get("identity", {}), "identity"), roles, glass_role)
    return Policy(version.strip(), actions, roles, subjects, mfa_labels, glass_role, minutes, subject_scopes, identity)


def _identity(body: dict[str, Any], roles: Mapping[str, Role], glass_role: str) -> IdentityMapping:
    """``[identity]``: an explicit claim value → roles table; anything not listed confers nothing."""
    _unknown(set(body), _IDENTITY_KEYS, "identity")
    claim = body.get("roles_claim", "")
    if not isinstance(claim, str) or ("roles_claim" in body and not claim.strip()):
        raise PolicyError("identity.roles_claim must be a non-empty string (the token claim with groups or roles)")
    raw_map = _table(body.get("role_map", {}), "identity.role_map")
    if raw_map and not claim:
        raise PolicyError("identity.role_map needs identity.roles_claim (which token claim holds the values)")
    role_map: dict[str, tuple[RoleGrant, ...]] = {}
    for value, entry in raw_map.items():
        where = f"identity.role_map.{value!r}"
        if not value.strip():
            raise PolicyError("identity.role_map: a claim value must be a non-empty string")
        if isinstance(entry, dict):
            _unknown(set(entry), _ROLE_MAP_KEYS, where)
            mapped = _strings(entry.get("roles"), f"{where}.roles")
            scopes = _scopes(entry["scopes"], f"{where}.scopes") if "scopes" in entry else (EVERYWHERE,)
        else:
            mapped, scopes = _strings(entry, where), (EVERYWHERE,)
        if not mapped:
            raise PolicyError(f"{where} must name at least one role")
        for role in mapped:
            if role not in roles:
                raise PolicyError(f"{where}: role {role!r} is not defined")
            if role == glass_role:
                # An emergency override is announced and time-limited; a group could hold it forever.
                raise PolicyError(f"{where}: role {role!r} is conferred only by break-glass")
        role_map[value] = tuple(RoleGrant(role, scope) for role in mapped for scope in scopes)
    return IdentityMapping(claim.strip(), role_map)


def _scopes(value: Any, where: str) -> tuple[Scope, ...]:
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{where} must be a non-empty list of tables")
    out = []
    for i, raw in enumerate(value):
        body = _table(raw, f"{where}[{i}]")
        _unknown(set(body), _SCOPE_KEYS, f"{where}[{i}]")
        if not body or not all(isinstance(v, str) and v for v in body.values()):
            raise PolicyError(f"{where}[{i}] needs a non-empty site and/or department")
        out.append(Scope(site=body.get("site", ""), department=body.get("department", "")))
    return tuple(out)


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
    """Deny by default: allow only when a role bound to the subject — standing (subjects table or
    mapped token claims), or by a grant in force at ``context.at`` (the subject's own, or one to
    holders of a standing role) — lists ``action`` and its scope covers ``resource``."""
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
    standing = policy.bindings(subject_id, context.claim_values)
    held = {b.role for b in standing}
    in_force = [
        g
        for g in context.grants
        if g.role in policy.roles and g.in_force(context.at) and (not g.holder_role or g.holder_role in held)
    ]
    if not standing and not in_force and subject_id not in policy.subjects:
        return deny("unknown_subject", "unknown subject")
    bindings = [*standing, *in_force]
    applicable = [b for b in bindings if b.scope.covers(resource)]
    roles = tuple(dict.fromkeys(b.role for b in applicable))
    granting = [b for b in applicable if action in policy.roles[b.role].actions]
    if not granting:
        if any(action in policy.roles[b.role].actions for b in bindings):
            # Reason names the rule only: which site, department, patient or study stays out of it.
            return deny("out_of_scope", f"no role of the subject grants {action} on this resource", roles)
        return deny("no_role", f"no role of the subject grants {action}", roles)
    sensitive = sorted(policy.mfa_labels.intersection(resource.labels))
    if sensitive and not context.mfa:
        # Machine-readable for the client: ask the user to step up, then retry.
        return deny("mfa_required", f"mfa required for {', '.join(sensitive)} resources", roles, ("mfa-required",))
    granting_roles = [policy.roles[r] for r in dict.fromkeys(b.role for b in granting)]
    duties = {d for role in granting_roles for d in role.obligations.get(action, ())}
    if all(b.break_glass for b in granting):
        # Allowed only by an emergency override: every such access is flagged for review.
        duties.add("break-glass")
    return Decision(
        True, f"granted by role {granting_roles[0].name}", roles, tuple(sorted(duties)), policy.version, "granted"
    )
