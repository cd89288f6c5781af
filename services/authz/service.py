"""AuthzService.Check: decide, record the decision in the audit trail, then answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import grpc

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.metrics import DECISIONS, DURATION
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.policy import Decision, Policy, PolicyError, decide, load_policy
from services.authz.tokens import TokenRejected, TokenVerifier

log = logging.getLogger("dicomsafe.authz")

SERVICE_NAME = "dicomsafe.v1.AuthzService"


class AuthzServicer(authz_pb2_grpc.AuthzServiceServicer):
    def __init__(self, policy: Policy, audit: AuditEmitter, verifier: TokenVerifier | None) -> None:
        self._policy = policy
        self._audit = audit
        self._verifier = verifier

    @property
    def policy_version(self) -> str:
        return self._policy.version

    async def reload(self, path: Path) -> bool:
        """Swap in the policy file's current content if it is valid; audited either way.

        A bad file never replaces a good policy: the service keeps deciding with the old one.
        """
        old = self._policy.version
        try:
            new = await asyncio.to_thread(load_policy, path)
        except PolicyError as exc:
            log.error("policy reload refused", extra={"error": str(exc)})
            await self._audit.emit(
                audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED,
                audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE,
                "authz",
                reason=f"new policy rejected: {exc}",
                details={"policy_version": old},
            )
            return False
        if new == self._policy:
            return False
        self._policy = new
        log.info("policy reloaded", extra={"from_version": old, "to_version": new.version})
        await self._audit.emit(
            audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            "authz",
            reason="policy reloaded",
            details={"from_version": old, "to_version": new.version},
        )
        return True

    async def _decide(self, request: authz_pb2.CheckRequest) -> tuple[str, bool, Decision]:
        """(subject, mfa, decision): the subject is the token's when tokens are required."""
        labels = list(request.resource.labels)
        if self._verifier is None:
            return request.subject.id, False, decide(self._policy, request.subject.id, request.action, labels)
        try:
            identity = await asyncio.to_thread(self._verifier.verify, request.subject.access_token)
        except TokenRejected as exc:
            return request.subject.id, False, Decision(False, "unauthenticated", f"unauthenticated: {exc.reason}")
        if request.subject.id and request.subject.id != identity.subject:
            return request.subject.id, False, Decision(False, "subject_mismatch", "subject does not match the token")
        decision = decide(self._policy, identity.subject, request.action, labels, mfa=identity.mfa)
        return identity.subject, identity.mfa, decision

    async def Check(
        self, request: authz_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> authz_pb2.CheckResponse:
        if not (request.subject.id or request.subject.access_token) or not request.action:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a subject (id or access token) and an action are required"
            )
        started = time.perf_counter()
        subject, mfa, decision = await self._decide(request)
        DECISIONS.labels(str(decision.allow).lower(), decision.code).inc()
        decision_id = str(uuid.uuid4())
        outcome = (
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
            if decision.allow
            else audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
        )
        try:
            await self._audit.emit(
                audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
                outcome,
                subject or "anonymous",
                actor_roles=decision.roles,
                study_instance_uid=request.resource.study_instance_uid,
                object_id=request.resource.object_id,
                reason=decision.reason,
                details={
                    "decision_id": decision_id,
                    "policy_version": self._policy.version,
                    "action": request.action,
                    "resource_type": request.resource.type,
                    "purpose": request.context.get("purpose", ""),
                    "authenticated": "token" if self._verifier else "none",
                    "mfa": str(mfa).lower(),
                    "labels": ",".join(request.resource.labels),
                },
            )
        except Exception:
            log.exception("decision not audited; refusing to answer")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
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
            policy_version=self._policy.version,
            decision_id=decision_id,
            subject=subject,
        )
