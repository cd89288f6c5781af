"""AuthzService.Check: decide, record the decision in the audit trail, then answer."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from pymongo.errors import PyMongoError

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.metrics import DECISIONS, DURATION
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.grants import GrantStore, StoredGrant
from services.authz.policy import (
    Decision,
    Policy,
    PolicyError,
    RequestContext,
    ResourceRef,
    decide,
    load_policy,
)
from services.authz.tokens import TokenRejected, TokenVerifier

log = logging.getLogger("dicomsafe.authz")

SERVICE_NAME = "dicomsafe.v1.AuthzService"
# Temporary staff and consultants: longer access needs a role in the policy file.
MAX_GRANT = dt.timedelta(days=90)
# Time left for the gRPC reply after the audit event is acknowledged.
_REPLY_MARGIN_S = 0.2


class AuditUnavailable(Exception):
    """The audit event was not acknowledged by Kafka (no producer, broker down, timeout)."""


class AuthzServicer(authz_pb2_grpc.AuthzServiceServicer):
    def __init__(
        self,
        policy: Policy,
        audit: AuditEmitter | None,
        verifier: TokenVerifier | None,
        grants: GrantStore | None = None,
        audit_timeout_s: float = 5.0,
    ) -> None:
        self._policy = policy
        # None until the audit producer is connected: until then every call fails closed.
        self._audit = audit
        self._verifier = verifier
        self._grants = grants
        self._audit_timeout_s = audit_timeout_s

    def set_audit(self, audit: AuditEmitter | None) -> None:
        self._audit = audit

    async def _emit(
        self,
        action: audit_pb2.AuditAction.ValueType,
        outcome: audit_pb2.AuditOutcome.ValueType,
        actor: str,
        *,
        budget_s: float | None = None,
        **fields: Any,
    ) -> None:
        """Publish one audit event and wait for Kafka's acknowledgement, bounded in time.

        Raises ``AuditUnavailable`` otherwise. A send abandoned on timeout may still reach
        the trail later: the trail can over-report an unanswered decision, never miss one.
        """
        if self._audit is None:
            raise AuditUnavailable("audit producer not connected")
        timeout = self._audit_timeout_s if budget_s is None else max(0.0, min(self._audit_timeout_s, budget_s))
        try:
            await asyncio.wait_for(self._audit.emit(action, outcome, actor, **fields), timeout=timeout)
        except Exception as exc:  # KafkaError, TimeoutError, ...: all mean "not recorded"
            raise AuditUnavailable(type(exc).__name__) from exc

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
            await self._emit(
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
        await self._emit(
            audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            "authz",
            reason="policy reloaded",
            details={"from_version": old, "to_version": new.version},
        )
        self._policy = new
        log.info("policy reloaded", extra={"from_version": old, "to_version": new.version})
        return True

    async def _identify(self, subject: authz_pb2.Subject) -> tuple[str, bool, Decision | None]:
        """(subject id, mfa, refusal): with tokens required, the id is the verified token's."""
        if self._verifier is None:
            return subject.id, False, None
        try:
            identity = await asyncio.to_thread(self._verifier.verify, subject.access_token)
        except TokenRejected as exc:
            refusal = Decision(
                False, f"unauthenticated: {exc.reason}", policy_version=self._policy.version, code="unauthenticated"
            )
            return subject.id, False, refusal
        if subject.id and subject.id != identity.subject:
            refusal = Decision(
                False, "subject does not match the token", policy_version=self._policy.version, code="subject_mismatch"
            )
            return subject.id, False, refusal
        return identity.subject, identity.mfa, None

    async def _decide(self, request: authz_pb2.CheckRequest) -> tuple[str, bool, Decision]:
        """(subject, mfa, decision), counting the grants in force right now."""
        subject, mfa, refusal = await self._identify(request.subject)
        if refusal is not None:
            return subject, mfa, refusal
        resource = ResourceRef(
            type=request.resource.type,
            study_instance_uid=request.resource.study_instance_uid,
            object_id=request.resource.object_id,
            labels=frozenset(request.resource.labels),
        )
        grants = await self._active_grants(subject, request.resource.study_instance_uid)
        purpose = request.context.get("purpose", "")
        ctx = RequestContext(purpose=purpose, mfa=mfa, granted_roles=tuple(g.role for g in grants))
        decision = decide(self._policy, subject, request.action, resource, ctx)
        if decision.allow and any(g.break_glass for g in grants):
            ordinary_ctx = replace(ctx, granted_roles=tuple(g.role for g in grants if not g.break_glass))
            ordinary = decide(self._policy, subject, request.action, resource, ordinary_ctx)
            if not ordinary.allow:
                # Allowed only by an emergency override: every such access is flagged for review.
                decision = replace(decision, obligations=(*decision.obligations, "break-glass"))
        return subject, mfa, decision

    async def _active_grants(self, subject: str, study: str) -> list[StoredGrant]:
        if self._grants is None or not subject:
            return []
        try:
            return await self._grants.active(subject, study, dt.datetime.now(dt.UTC))
        except PyMongoError:
            # Without the grant store, decide on the policy file alone: grants only ever add access.
            log.warning("grant store unavailable; deciding without grants")
            return []

    async def Check(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.CheckResponse:
        if not (request.subject.id or request.subject.access_token) or not request.action:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a subject (id or access token) and an action are required"
            )
        started = time.perf_counter()
        subject, mfa, decision = await self._decide(request)
        decision_id = str(uuid.uuid4())
        outcome = (
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
            if decision.allow
            else audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
        )
        remaining = context.time_remaining()  # the caller's deadline, if any
        try:
            await self._emit(
                audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
                outcome,
                subject or "anonymous",
                budget_s=None if remaining is None else remaining - _REPLY_MARGIN_S,
                actor_roles=decision.roles,
                study_instance_uid=request.resource.study_instance_uid,
                object_id=request.resource.object_id,
                reason=decision.reason,
                details={
                    "decision_id": decision_id,
                    "policy_version": decision.policy_version,
                    "action": request.action,
                    "resource_type": request.resource.type,
                    "purpose": request.context.get("purpose", ""),
                    "authenticated": "token" if self._verifier else "none",
                    "mfa": str(mfa).lower(),
                    "labels": ",".join(request.resource.labels),
                },
            )
        except AuditUnavailable as exc:
            # Fail closed: no answer (so no allow) for a decision the trail does not hold.
            log.error("decision not audited; refusing to answer", extra={"decision_id": decision_id, "error": str(exc)})
            DECISIONS.labels("false", "audit_unavailable").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
        DECISIONS.labels(str(decision.allow).lower(), decision.code).inc()
        log.info(
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
        self, caller: authz_pb2.Subject, action: str, context: grpc.aio.ServicerContext[object, object]
    ) -> tuple[str, bool, Decision]:
        if self._grants is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "grants need AUTHZ_MONGODB_URI")
        subject, mfa, refusal = await self._identify(caller)
        decision = refusal or decide(self._policy, subject, action, context=RequestContext(mfa=mfa))
        return subject, mfa, decision

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
                "role": grant.role,
                "not_before": grant.not_before.isoformat(),
                "not_after": grant.not_after.isoformat(),
                "break_glass": str(grant.break_glass).lower(),
            }
        outcome = (
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS if allowed else audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
        )
        try:
            await self._emit(
                action,
                outcome,
                actor or "anonymous",
                study_instance_uid=grant.study_instance_uid if grant else "",
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
        if not g.subject or not g.role or not g.reason:
            problem = "grant needs a subject, a role and a reason"
        elif g.role not in self._policy.roles or g.role == self._policy.break_glass_role:
            problem = f"role {g.role} cannot be granted"
        elif not (not_before < not_after and now < not_after and not_after - not_before <= MAX_GRANT):
            problem = f"grant window must end in the future and last at most {MAX_GRANT.days} days"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        grant = await self._grants.create(  # type: ignore[union-attr]
            g.subject, g.role, g.study_instance_uid, not_before, not_after, g.reason, caller
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
        return self._to_proto(grant)

    async def BreakGlass(
        self, request: authz_pb2.BreakGlassRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.Grant:
        caller, mfa, decision = await self._authorize_management(request.caller, "emergency.access", context)
        override = audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE
        refusal = ""
        if not decision.allow:
            refusal = decision.reason
        elif not mfa:
            refusal = "break-glass requires multi-factor authentication"
        elif not request.reason.strip() or not request.study_instance_uid:
            refusal = "break-glass requires a study and a stated reason"
        elif not self._policy.break_glass_role:
            refusal = "break-glass is not configured in the policy"
        now = dt.datetime.now(dt.UTC)
        if not refusal:
            active = await self._grants.active(caller, request.study_instance_uid, now)  # type: ignore[union-attr]
            if any(g.break_glass and g.study_instance_uid == request.study_instance_uid for g in active):
                refusal = "break-glass grants are not renewable: one is already active for this study"
        if refusal:
            await self._record_grant(override, False, caller, refusal, context)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        grant = await self._grants.create(  # type: ignore[union-attr]
            caller,
            self._policy.break_glass_role,
            request.study_instance_uid,
            now,
            now + dt.timedelta(minutes=self._policy.break_glass_minutes),
            request.reason,
            caller,
            break_glass=True,
        )
        # DICOM 110113 Security Alert / 110127 "Emergency Override Started".
        await self._record_grant(
            override, True, caller, f"emergency override started: {request.reason}", context, grant
        )
        log.warning("break-glass grant issued", extra={"grant_id": grant.grant_id})
        return self._to_proto(grant)
