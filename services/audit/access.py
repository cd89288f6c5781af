"""Who may read the audit trail: authz decides, and every attempt is itself audited.

Reading the trail discloses who saw which patient, so it is as sensitive as the images:
authz's `Check` decides on `audit.read` (Query) or `audit.verify` (Verify) — the policy gives
those to auditors and privacy officers only — and each attempt, allowed, refused or failed,
becomes an `AUDIT_ACTION_AUDIT_QUERIED` event on `audit.events` before anything is answered.
No decision or no acknowledged audit event means no answer (fail closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc

Outcome = audit_pb2.AuditOutcome
READ = "audit.read"
VERIFY = "audit.verify"
# One answer for every refusal: a caller learns nothing about the policy from it.
NOT_PERMITTED = "not permitted to read the audit trail"


class Refused(Exception):
    """The caller gets this status and message; the attempt has already been audited."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    """What is asked, recorded with the attempt (identifiers only, as every audit event)."""

    operation: str  # "query" or "verify"
    subject_id: str
    access_token: str
    study_instance_uid: str = ""
    patient_ref: str = ""
    object_id: str = ""
    # Further filters (actor, chain, time range, limit), as text.
    filters: Mapping[str, str] | None = None


class AuditAccess:
    def __init__(
        self, authz: authz_pb2_grpc.AuthzServiceAsyncStub, audit: AuditEmitter, deadline_s: float = 10.0
    ) -> None:
        self._authz = authz
        self._audit = audit
        self._deadline_s = deadline_s

    async def authorize(self, action: str, request: Request) -> str:
        """Return the verified subject allowed to proceed, or raise ``Refused``."""
        if not (request.subject_id or request.access_token):
            await self._record(request, Outcome.AUDIT_OUTCOME_DENIED, "no credentials", None)
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "an access token is required")
        check = authz_pb2.CheckRequest(
            subject=authz_pb2.Subject(id=request.subject_id, access_token=request.access_token),
            action=action,
            resource=authz_pb2.Resource(type="audit"),
            context={"operation": request.operation},
        )
        try:
            decision = await self._authz.Check(check, timeout=self._deadline_s)
        except grpc.aio.AioRpcError as exc:
            # No decision is a refusal; the attempt is still recorded.
            await self._record(request, Outcome.AUDIT_OUTCOME_FAILURE, f"authz unavailable ({exc.code().name})", None)
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"authorisation unavailable ({exc.code().name})") from None
        if not decision.allow:
            await self._record(request, Outcome.AUDIT_OUTCOME_DENIED, decision.reason, decision)
            if "mfa-required" in decision.obligations:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "mfa-required")
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, NOT_PERMITTED)
        if decision.obligations:
            # An obligation this service cannot honour (none exists for audit.* today) means no answer.
            await self._record(request, Outcome.AUDIT_OUTCOME_DENIED, "unsupported obligation", decision)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, NOT_PERMITTED)
        await self._record(request, Outcome.AUDIT_OUTCOME_SUCCESS, "", decision)
        return decision.subject or request.subject_id

    async def _record(
        self,
        request: Request,
        outcome: audit_pb2.AuditOutcome.ValueType,
        reason: str,
        decision: authz_pb2.CheckResponse | None,
    ) -> None:
        details = {"operation": request.operation, **(request.filters or {})}
        if decision is not None:
            details["decision_id"] = decision.decision_id
            details["policy_version"] = decision.policy_version
        # The verified subject when authz saw a token; otherwise what the caller claimed.
        actor = (decision.subject if decision is not None else "") or request.subject_id or "unauthenticated"
        try:
            await asyncio.wait_for(
                self._audit.emit(
                    audit_pb2.AuditAction.AUDIT_ACTION_AUDIT_QUERIED,
                    outcome,
                    actor,
                    actor_roles=list(decision.roles) if decision is not None else [],
                    study_instance_uid=request.study_instance_uid,
                    patient_ref=request.patient_ref,
                    object_id=request.object_id,
                    reason=reason,
                    details=details,
                ),
                timeout=self._deadline_s,
            )
        except Exception as exc:  # noqa: BLE001 — any failure to record means no answer
            raise Refused(
                grpc.StatusCode.UNAVAILABLE, f"access to the audit trail cannot be recorded ({type(exc).__name__})"
            ) from None
