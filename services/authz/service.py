"""AuthzService.Check: decide, record the decision in the audit trail, then answer."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from pymongo.errors import PyMongoError

from dicomsafe.common.metrics import DECISIONS, DURATION
from dicomsafe.common.tls import peer_identity
from dicomsafe.common.token_fingerprint import token_fingerprint
from dicomsafe.dimse.peers import PRINCIPAL_PREFIX as DIMSE_PRINCIPAL_PREFIX
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.break_glass import OverrideAnnouncer
from services.authz.grant_cache import GrantCache
from services.authz.grants import GrantStore, StoredGrant
from services.authz.policy import (
    Decision,
    Policy,
    PolicyError,
    RequestContext,
    ResourceRef,
    Scope,
    decide,
    load_policy,
)
from services.authz.tokens import TokenRejected, TokenVerifier
from services.authz.trail import AuditUnavailable, Trail

log = logging.getLogger("dicomsafe.authz")

SERVICE_NAME = "dicomsafe.v1.AuthzService"
# Temporary staff and consultants: longer access needs a role in the policy file.
MAX_GRANT = dt.timedelta(days=90)
# Checks of one CheckMany call: a QIDO page (limit ≤ 1000 is split) or a C-FIND's matches; the
# bound keeps one call's audit burst and reply size modest.
MAX_CHECKS_PER_CALL = 256
# Time left for the gRPC reply after the audit event is acknowledged.
_REPLY_MARGIN_S = 0.2
# A patient scope names crypto's keyed pseudonym (erasure key reference), never a Patient ID:
# anything else is refused, so no identifier in clear lands in the grant store.
_PATIENT_REF = re.compile(r"[0-9a-f]{32}")
# A DICOM peer's configured name (dicomsafe.dimse.peers): the subject is "dimse:<name>".
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _invalid(request: authz_pb2.CheckRequest) -> str | None:
    """Why a check cannot be decided at all, or None."""
    s = request.subject
    if not (s.id or s.access_token or s.dimse_peer) or not request.action:
        return "a subject (id, access token or DICOM peer) and an action are required"
    if request.resource.patient_ref and not _PATIENT_REF.fullmatch(request.resource.patient_ref):
        # Refused before any decision, so a Patient ID sent by mistake never reaches the trail.
        return "resource.patient_ref must be a patient pseudonym"
    return None


def _authenticated_by(subject: authz_pb2.Subject, tokens: bool) -> str:
    """How the subject was established, for the trail: a token, a DIMSE peer certificate, or nothing."""
    if subject.dimse_peer:
        return "dimse-certificate"
    return "token" if tokens else "none"


@dataclass(frozen=True)
class Caller:
    """Who a request is about, as authentication established it."""

    subject: str
    mfa: bool = False
    # The verified token's values of the policy's roles claim; always empty without a verified
    # token (a development-mode subject id carries no claims).
    claim_values: tuple[str, ...] = ()
    refusal: Decision | None = None


class AuthzServicer(authz_pb2_grpc.AuthzServiceServicer):
    def __init__(
        self,
        policy: Policy,
        trail: Trail,
        verifier: TokenVerifier | None,
        grants: GrantStore | None = None,
        grant_cache: GrantCache | None = None,
        dimse_vouchers: frozenset[str] = frozenset(),
    ) -> None:
        self._policy = policy
        self._dimse_vouchers = dimse_vouchers
        self._trail = trail
        self._verifier = verifier
        self._grants = grants
        # Checks read grants through it when given; management (and break-glass's renewal check)
        # always read the store itself.
        self._grant_reader: GrantCache | GrantStore | None = grant_cache or grants
        self.announcer = OverrideAnnouncer(grants, trail) if grants is not None else None

    @property
    def policy_version(self) -> str:
        return self._policy.version

    async def reload(self, path: Path) -> bool:
        """Swap in the policy file's current content if it is valid; audited either way.

        A bad file never replaces a good policy: the service keeps deciding with the old one.
        Raises ``AuditUnavailable`` (policy unchanged) when the change cannot be audited.
        """
        old = self._policy.version
        try:
            new = await asyncio.to_thread(load_policy, path)
        except PolicyError as exc:
            log.error("policy reload refused", extra={"error": str(exc)})
            await self._trail.audit(
                audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED,
                audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE,
                "authz",
                reason=f"new policy rejected: {exc}",
                details={"policy_version": old},
            )
            return False
        if new == self._policy:
            return False
        # Recorded before it takes effect: an unaudited policy change never decides anything.
        await self._trail.audit(
            audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            "authz",
            reason="policy reloaded",
            details={"from_version": old, "to_version": new.version},
        )
        self._policy = new
        log.info("policy reloaded", extra={"from_version": old, "to_version": new.version})
        return True

    def _dimse_peer(self, subject: authz_pb2.Subject, workload: str | None) -> Caller:
        """A DICOM peer, on the word of the listener that admitted it by its certificate."""
        name = subject.dimse_peer
        if subject.id or subject.access_token:
            reason = "a DICOM peer is named alone, without a user id or token"
        elif not _PEER_NAME.fullmatch(name):
            reason = "malformed DICOM peer name"
        elif workload is None and self._verifier is None:
            # Development without TLS: as with a bare subject id, taken on trust.
            return Caller(f"{DIMSE_PRINCIPAL_PREFIX}{name}")
        elif workload not in self._dimse_vouchers:
            reason = "this caller may not vouch for DICOM peers"
        else:
            return Caller(f"{DIMSE_PRINCIPAL_PREFIX}{name}")
        refusal = Decision(
            False, f"unauthenticated: {reason}", policy_version=self._policy.version, code="unauthenticated"
        )
        return Caller(f"{DIMSE_PRINCIPAL_PREFIX}{name}" if _PEER_NAME.fullmatch(name) else "", refusal=refusal)

    async def _identify(self, subject: authz_pb2.Subject, policy: Policy, workload: str | None = None) -> Caller:
        """With tokens required, the caller is the verified token's subject (and its claims)."""
        if subject.dimse_peer:
            return self._dimse_peer(subject, workload)
        if self._verifier is None:
            return Caller(subject.id)
        try:
            identity = self._verifier.remembered(subject.access_token)
            if identity is None:
                identity = await asyncio.to_thread(self._verifier.verify, subject.access_token)
        except TokenRejected as exc:
            refusal = Decision(
                False, f"unauthenticated: {exc.reason}", policy_version=self._policy.version, code="unauthenticated"
            )
            return Caller(subject.id, refusal=refusal)
        if subject.id and subject.id != identity.subject:
            refusal = Decision(
                False, "subject does not match the token", policy_version=self._policy.version, code="subject_mismatch"
            )
            return Caller(subject.id, refusal=refusal)
        claims = identity.claim_values(policy.identity.roles_claim)
        return Caller(identity.subject, identity.mfa, claims)

    async def _context(self, caller: Caller, policy: Policy, purpose: str = "") -> RequestContext:
        """The request facts for ``decide``, with the grants as they stand right now."""
        now = dt.datetime.now(dt.UTC)
        grants = await self._grants_of(caller.subject, policy.held_roles(caller.subject, caller.claim_values), now)
        return RequestContext(
            purpose=purpose,
            mfa=caller.mfa,
            grants=tuple(g.as_role_grant() for g in grants),
            at=now,
            claim_values=caller.claim_values,
        )

    async def _decide(self, request: authz_pb2.CheckRequest, workload: str | None) -> tuple[Caller, Decision]:
        policy = self._policy  # one policy for the whole decision, even across a reload
        caller = await self._identify(request.subject, policy, workload)
        if caller.refusal is not None:
            return caller, caller.refusal
        r = request.resource
        resource = ResourceRef(
            type=r.type,
            study_instance_uid=r.study_instance_uid,
            object_id=r.object_id,
            labels=frozenset(r.labels),
            site=r.site,
            department=r.department,
            patient_ref=r.patient_ref,
        )
        ctx = await self._context(caller, policy, request.context.get("purpose", ""))
        return caller, decide(policy, caller.subject, request.action, resource, ctx)

    async def _grants_of(self, subject: str, roles: frozenset[str], now: dt.datetime) -> list[StoredGrant]:
        """The subject's own grants and those to holders of ``roles`` that have not ended."""
        if self._grants is None or not subject:
            return []
        try:
            assert self._grant_reader is not None
            return [g for g in await self._grant_reader.active(subject, now, roles) if g.usable]
        except PyMongoError:
            # Without the grant store, decide on the policy file alone: grants only ever add access.
            log.warning("grant store unavailable; deciding without grants")
            return []

    async def Check(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.CheckResponse:
        if (invalid := _invalid(request)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
        try:
            return await self._check(request, peer_identity(context.auth_context()), context.time_remaining())
        except AuditUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
            raise  # abort raises; this line is never reached

    async def CheckMany(
        self, request: authz_pb2.CheckManyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.CheckManyResponse:
        if len(request.checks) > MAX_CHECKS_PER_CALL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_CHECKS_PER_CALL} checks per call")
        for n, check in enumerate(request.checks):
            if (invalid := _invalid(check)) is not None:
                # Nothing is decided (nor audited) when any check of the call is malformed.
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"checks[{n}]: {invalid}")
        workload, remaining = peer_identity(context.auth_context()), context.time_remaining()
        # Decided concurrently: their audit events go out together, so the producer sends them
        # in one batch and the broker acknowledges them together (a group commit), while each
        # decision still waits for its own event's acknowledgement.
        outcomes = await asyncio.gather(
            *(self._check(check, workload, remaining) for check in request.checks), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, AuditUnavailable):
                # Fail closed for the whole call: no decision is handed out, allows included.
                await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
            if isinstance(outcome, BaseException):
                raise outcome
        return authz_pb2.CheckManyResponse(results=[o for o in outcomes if isinstance(o, authz_pb2.CheckResponse)])

    async def _check(
        self, request: authz_pb2.CheckRequest, workload: str | None, remaining: float | None
    ) -> authz_pb2.CheckResponse:
        """One decision, recorded in the audit trail before it is returned (``AuditUnavailable``
        if the trail did not acknowledge it: the caller then answers nothing)."""
        started = time.perf_counter()
        caller, decision = await self._decide(request, workload)
        subject, mfa = caller.subject, caller.mfa
        decision_id = str(uuid.uuid4())
        outcome = (
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
            if decision.allow
            else audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
        )
        try:
            await self._trail.audit(
                audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
                outcome,
                subject or "anonymous",
                budget_s=None if remaining is None else remaining - _REPLY_MARGIN_S,
                actor_roles=decision.roles,
                study_instance_uid=request.resource.study_instance_uid,
                object_id=request.resource.object_id,
                patient_ref=request.resource.patient_ref,
                reason=decision.reason,
                details={
                    "decision_id": decision_id,
                    "policy_version": decision.policy_version,
                    "action": request.action,
                    "resource_type": request.resource.type,
                    "site": request.resource.site,
                    "department": request.resource.department,
                    "purpose": request.context.get("purpose", ""),
                    "authenticated": _authenticated_by(request.subject, self._verifier is not None),
                    "mfa": str(mfa).lower(),
                    "labels": ",".join(request.resource.labels),
                    # "break-glass" here flags every access made under an emergency override.
                    "obligations": ",".join(decision.obligations),
                    "token_fingerprint": token_fingerprint(request.subject.access_token),
                },
            )
        except AuditUnavailable as exc:
            # Fail closed: no answer (so no allow) for a decision the trail does not hold.
            log.error("decision not audited; refusing to answer", extra={"decision_id": decision_id, "error": str(exc)})
            DECISIONS.labels("false", "audit_unavailable").inc()
            raise
        DECISIONS.labels(str(decision.allow).lower(), decision.code).inc()
        # The audit trail is the record of decisions and the metrics count them; a log line per
        # check would only add cost on the hottest path.
        log.debug(
            "decision",
            extra={"decision_id": decision_id, "allow": decision.allow, "code": decision.code},
        )
        DURATION.labels("authz", "check").observe(time.perf_counter() - started)
        return authz_pb2.CheckResponse(
            allow=decision.allow,
            reason=decision.reason,
            reason_code=decision.code,
            obligations=list(decision.obligations),
            roles=list(decision.roles),
            policy_version=decision.policy_version,
            decision_id=decision_id,
            subject=subject,
        )

    # -- grants -------------------------------------------------------------------------------

    async def _authorize_management(
        self,
        caller: authz_pb2.Subject,
        action: str,
        context: grpc.aio.ServicerContext[object, object],
        resource: ResourceRef | None = None,
    ) -> tuple[str, bool, Decision]:
        """Decided like a check (standing roles, token claims and grants), for ``resource``."""
        if self._grants is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "grants need AUTHZ_MONGODB_URI")
        policy = self._policy
        who = await self._identify(caller, policy)
        if who.refusal is not None:
            return who.subject, who.mfa, who.refusal
        ctx = await self._context(who, policy)
        return who.subject, who.mfa, decide(policy, who.subject, action, resource, ctx)

    async def _require_manager(
        self, caller: authz_pb2.Subject, context: grpc.aio.ServicerContext[object, object]
    ) -> str:
        """The verified caller, if allowed to manage grants; otherwise an audited refusal."""
        subject, _, decision = await self._authorize_management(caller, "grants.manage", context)
        if not decision.allow:
            await self._record_grant(
                audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED, False, subject, decision.reason, context
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        return subject

    async def _record_grant(
        self,
        action: audit_pb2.AuditAction.ValueType,
        allowed: bool,
        actor: str,
        reason: str,
        context: grpc.aio.ServicerContext[object, object],
        grant: StoredGrant | None = None,
    ) -> None:
        details = {"policy_version": self._policy.version}
        if grant is not None:
            details |= {
                "grant_id": grant.grant_id,
                "grantee": grant.subject,
                "grantee_role": grant.grantee_role,
                "role": grant.role,
                "not_before": grant.not_before.isoformat(),
                "not_after": grant.not_after.isoformat(),
                "break_glass": str(grant.break_glass).lower(),
                "scope": grant.scope.kind,
                "site": grant.site,
                "department": grant.department,
            }
        outcome = (
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS if allowed else audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
        )
        try:
            await self._trail.audit(
                action,
                outcome,
                actor or "anonymous",
                study_instance_uid=grant.study_instance_uid if grant else "",
                patient_ref=grant.patient_ref if grant else "",
                reason=reason,
                details=details,
            )
        except AuditUnavailable as exc:
            log.error("grant change not audited", extra={"error": str(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")

    @staticmethod
    def _to_proto(grant: StoredGrant) -> authz_pb2.Grant:
        out = authz_pb2.Grant(
            grant_id=grant.grant_id,
            subject=grant.subject,
            role=grant.role,
            study_instance_uid=grant.study_instance_uid,
            break_glass=grant.break_glass,
            reason=grant.reason,
            created_by=grant.created_by,
            site=grant.site,
            department=grant.department,
            patient_ref=grant.patient_ref,
            grantee_role=grant.grantee_role,
        )
        out.not_before.FromDatetime(grant.not_before)
        out.not_after.FromDatetime(grant.not_after)
        if grant.revoked_at:
            out.revoked_at.FromDatetime(grant.revoked_at)
        return out

    async def CreateGrant(
        self, request: authz_pb2.CreateGrantRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.Grant:
        caller = await self._require_manager(request.caller, context)
        changed = audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED
        g = request.grant
        now = dt.datetime.now(dt.UTC)
        not_before = g.not_before.ToDatetime(tzinfo=dt.UTC) if g.HasField("not_before") else now
        not_after = g.not_after.ToDatetime(tzinfo=dt.UTC)
        problem = ""
        unassignable = ("", self._policy.break_glass_role)
        if bool(g.subject) == bool(g.grantee_role) or not g.role or not g.reason:
            problem = "grant needs a subject or a grantee_role (exactly one), a role and a reason"
        elif g.role not in self._policy.roles or g.role in unassignable:
            problem = f"role {g.role} cannot be granted"
        elif g.grantee_role and (g.grantee_role not in self._policy.roles or g.grantee_role in unassignable):
            # The break-glass role is meant to be held only through an announced override: its
            # holders are no group to widen.
            problem = f"role {g.grantee_role} has no holders to grant to"
        elif not (not_before < not_after and now < not_after and not_after - not_before <= MAX_GRANT):
            problem = f"grant window must end in the future and last at most {MAX_GRANT.days} days"
        elif g.patient_ref and not _PATIENT_REF.fullmatch(g.patient_ref):
            problem = "patient_ref must be the patient's pseudonym (32 lowercase hex characters)"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        scope = Scope(g.site, g.department, g.patient_ref, g.study_instance_uid)
        grant = await self._grants.create(  # type: ignore[union-attr]
            g.subject, g.role, scope, not_before, not_after, g.reason, caller, grantee_role=g.grantee_role
        )
        await self._record_grant(changed, True, caller, f"grant created: {g.reason}", context, grant)
        return self._to_proto(grant)

    async def RevokeGrant(
        self, request: authz_pb2.RevokeGrantRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.Grant:
        caller = await self._require_manager(request.caller, context)
        changed = audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED
        grant = await self._grants.revoke(request.grant_id, dt.datetime.now(dt.UTC))  # type: ignore[union-attr]
        if grant is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such active grant")
        await self._record_grant(changed, True, caller, f"grant revoked: {request.reason}", context, grant)
        if grant.break_glass and self.announcer is not None:
            try:
                await self.announcer.stopped(grant, grant.revoked_at or dt.datetime.now(dt.UTC))
            except (AuditUnavailable, PyMongoError) as exc:
                # The revocation stands; the sweep announces the stop once the trail is back.
                log.error("override stop not announced yet", extra={"error": type(exc).__name__})
        return self._to_proto(grant)

    async def BreakGlass(
        self, request: authz_pb2.BreakGlassRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.Grant:
        study, patient = request.study_instance_uid, request.patient_ref
        if patient and not _PATIENT_REF.fullmatch(patient):
            # Refused before anything is recorded, so a Patient ID sent by mistake never reaches the trail.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "patient_ref must be a patient pseudonym")
        scope = Scope(patient_ref=patient) if patient and not study else Scope(study_instance_uid=study)
        caller, mfa, decision = await self._authorize_management(
            request.caller, "emergency.access", context, ResourceRef(study_instance_uid=study, patient_ref=patient)
        )
        override = audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE
        refusal = ""
        if not decision.allow:
            refusal = decision.reason
        elif not mfa:
            refusal = "break-glass requires multi-factor authentication"
        elif not request.reason.strip() or bool(study) == bool(patient):
            refusal = "break-glass requires a stated reason and either a study or a patient"
        elif not self._policy.break_glass_role:
            refusal = "break-glass is not configured in the policy"
        now = dt.datetime.now(dt.UTC)
        if not refusal:
            active = await self._grants.active(caller, now)  # type: ignore[union-attr]
            if any(g.break_glass and g.scope == scope for g in active):
                refusal = f"break-glass grants are not renewable: one is already active for this {scope.kind}"
        if refusal:
            await self._record_grant(override, False, caller, refusal, context)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        grants, announcer = self._grants, self.announcer
        assert grants is not None and announcer is not None  # _authorize_management checked the store
        grant = await grants.create(
            caller,
            self._policy.break_glass_role,
            scope,
            now,
            now + dt.timedelta(minutes=self._policy.break_glass_minutes),
            request.reason,
            caller,
            break_glass=True,
        )
        try:
            # DICOM 110113 Security Alert / 110127 "Emergency Override Started", audit and alert.
            await announcer.started(grant, decision.roles)
        except (AuditUnavailable, PyMongoError) as exc:
            # Never announced, so never usable; withdrawn so that it cannot surface later either.
            log.error("override start not announced; grant withdrawn", extra={"error": type(exc).__name__})
            with contextlib.suppress(PyMongoError):
                await grants.revoke(grant.grant_id, dt.datetime.now(dt.UTC))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
        log.warning("break-glass grant issued", extra={"grant_id": grant.grant_id})
        return self._to_proto(grant)
