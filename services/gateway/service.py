"""RetrievalService: describe → authz.Check → crypto.Open → stream, auditing the outcome."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.v1 import (
    audit_pb2,
    authz_pb2,
    authz_pb2_grpc,
    crypto_pb2,
    crypto_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.gateway.access import HONOURED_IDENTIFIED, Where, break_glass_details, resource
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway")

SERVICE_NAME = "dicomsafe.v1.RetrievalService"
READ_ACTION = "instance.read"
# One answer for "no such object" and "not yours": a caller must not learn which objects exist.
NOT_PERMITTED = "not found or not permitted"

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(
        self,
        authz: authz_pb2_grpc.AuthzServiceAsyncStub,
        crypto: crypto_pb2_grpc.CryptoServiceAsyncStub,
        audit: AuditEmitter,
        deadline_s: float,
        index: StudyIndex,
    ) -> None:
        self._authz = authz
        self._crypto = crypto
        self._audit = audit
        self._deadline = deadline_s
        self._index = index

    async def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[retrieval_pb2.RetrieveResponse]:
        if not (request.subject_id or request.access_token) or not request.object_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "an access token (or subject_id) and object_id are required"
            )
        try:
            desc = await self._crypto.Describe(
                crypto_pb2.DescribeRequest(object_id=request.object_id), timeout=self._deadline
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                await self._record(request, None, Outcome.AUDIT_OUTCOME_DENIED, "object not found")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, NOT_PERMITTED)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"crypto unavailable ({exc.code().name})")

        # The study's sensitivity labels and scope come from the index. Until the indexer has seen
        # the study they are unknown, and an unknown study might be a sensitive one: fail closed.
        try:
            known = await self._index.study_context(desc.study_instance_uid)
        except Exception as exc:  # noqa: BLE001 - MongoDB down
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"study index unavailable ({type(exc).__name__})")
        if known is None:
            await self._record(request, desc, Outcome.AUDIT_OUTCOME_FAILURE, "study not indexed yet")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "study not indexed yet, retry shortly")
        labels, site, department, _ = known
        check = authz_pb2.CheckRequest(
            subject=authz_pb2.Subject(id=request.subject_id, access_token=request.access_token),
            action=READ_ACTION,
            resource=resource(
                "instance",
                desc.study_instance_uid,
                object_id=desc.object_id,
                labels=labels,
                where=Where(site, department, desc.erasure_key_ref),
            ),
            context={"purpose": request.purpose} if request.purpose else {},
        )
        try:
            decision = await self._authz.Check(check, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            # No decision is a deny: fail closed.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"authorisation unavailable ({exc.code().name})")
        if not decision.allow:
            await self._record(request, desc, Outcome.AUDIT_OUTCOME_DENIED, decision.reason, decision)
            if "mfa-required" in decision.obligations:
                # The user holds a role for this; tell the client to step up and retry.
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "mfa-required")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, NOT_PERMITTED)
        # Retrieve streams the stored object as is: an emergency override is honoured (released
        # and flagged), de-identification is not (that is DICOMweb's, which re-encodes it).
        if set(decision.obligations) - HONOURED_IDENTIFIED:
            # Any other obligation (e.g. de-identification) means no release here.
            await self._record(request, desc, Outcome.AUDIT_OUTCOME_DENIED, "unsupported obligation", decision)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, NOT_PERMITTED)

        sent = 0
        try:
            stream = self._crypto.Open(
                crypto_pb2.OpenRequest(object_id=desc.object_id, on_behalf_of=decision.subject or request.subject_id),
                timeout=self._deadline,
            )
            async for piece in stream:
                sent += len(piece.data)
                yield retrieval_pb2.RetrieveResponse(data=piece.data)
        except grpc.aio.AioRpcError as exc:
            await self._record(
                request, desc, Outcome.AUDIT_OUTCOME_FAILURE, f"open failed ({exc.code().name})", decision
            )
            status = (
                grpc.StatusCode.DATA_LOSS if exc.code() == grpc.StatusCode.DATA_LOSS else grpc.StatusCode.UNAVAILABLE
            )
            await context.abort(status, f"retrieval failed ({exc.code().name})")
        await self._record(request, desc, Outcome.AUDIT_OUTCOME_SUCCESS, "", decision, sent)
        self._index.note_access(desc.study_instance_uid)

    async def _record(
        self,
        request: retrieval_pb2.RetrieveRequest,
        desc: crypto_pb2.ObjectDescription | None,
        outcome: audit_pb2.AuditOutcome.ValueType,
        reason: str,
        decision: authz_pb2.CheckResponse | None = None,
        sent: int = 0,
    ) -> None:
        details = {"purpose": request.purpose, "bytes": str(sent)}
        if decision is not None:
            details["decision_id"] = decision.decision_id
            details["policy_version"] = decision.policy_version
            # Under an emergency override the purpose of use is the emergency, whatever was asked.
            details.update(break_glass_details(decision.obligations))
        # The verified subject when authz saw a token; otherwise what the caller claimed.
        actor = (decision.subject if decision is not None else "") or request.subject_id or "unauthenticated"
        await self._audit.emit(
            Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
            outcome,
            actor,
            actor_roles=list(decision.roles) if decision is not None else [],
            study_instance_uid=desc.study_instance_uid if desc else "",
            sop_instance_uid=desc.sop_instance_uid if desc else "",
            object_id=request.object_id,
            patient_ref=desc.erasure_key_ref if desc else "",
            reason=reason,
            details=details,
        )
