"""Asking authz about one call: the same question for the gRPC retrieve path and for DICOMweb."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from dicomsafe.v1 import authz_pb2, authz_pb2_grpc

# Obligations this gateway knows how to honour; any other one means the data is not released.
DEIDENTIFY = "deidentify"
# Allowed only by an emergency override: released, and every release flagged for review.
BREAK_GLASS = "break-glass"
HONOURED = frozenset({DEIDENTIFY, BREAK_GLASS})
# What the routes that release identified data only (gRPC retrieval, DIMSE) honour: they have no
# de-identified release, so a de-identification obligation means nothing is released there.
HONOURED_IDENTIFIED = frozenset({BREAK_GLASS})
# authz's bound on checks per CheckMany call (services/authz/service.py MAX_CHECKS_PER_CALL).
CHECKS_PER_CALL = 256
# The audit trail's purpose of use for a break-glass release (exported as HL7 ActReason ETREAT).
EMERGENCY_PURPOSE = "emergency"


class AuthzUnavailable(Exception):
    """No decision could be obtained: the caller must fail closed."""


@dataclass(frozen=True)
class Verdict:
    allow: bool
    reason: str
    reason_code: str
    subject: str
    roles: tuple[str, ...]
    obligations: frozenset[str]
    decision_id: str
    policy_version: str

    @property
    def deidentify(self) -> bool:
        return DEIDENTIFY in self.obligations

    @property
    def break_glass(self) -> bool:
        return BREAK_GLASS in self.obligations

    @property
    def unhonourable(self) -> frozenset[str]:
        return self.obligations - HONOURED

    @property
    def releases_identified(self) -> bool:
        """Allowed, with nothing a route without de-identification cannot honour."""
        return self.allow and not self.obligations - HONOURED_IDENTIFIED

    def audit_details(self) -> dict[str, str]:
        details = {"decision_id": self.decision_id, "policy_version": self.policy_version}
        details.update(break_glass_details(self.obligations))
        return details


def break_glass_details(obligations: Iterable[str]) -> dict[str, str]:
    """What flags a record as made under an emergency override (for review and the exports)."""
    return {"break_glass": "true", "purpose": EMERGENCY_PURPOSE} if BREAK_GLASS in obligations else {}


@dataclass(frozen=True)
class Where:
    """What scoped grants match on: the study's site, department and patient pseudonym."""

    site: str = ""
    department: str = ""
    patient_ref: str = ""


def resource(
    kind: str,
    study_uid: str = "",
    *,
    object_id: str = "",
    labels: Iterable[str] = (),
    where: Where | None = None,
) -> authz_pb2.Resource:
    where = where or Where()
    return authz_pb2.Resource(
        type=kind,
        study_instance_uid=study_uid,
        object_id=object_id,
        labels=list(labels),
        site=where.site,
        department=where.department,
        patient_ref=where.patient_ref,
    )


class AccessChecker:
    def __init__(self, stub: authz_pb2_grpc.AuthzServiceAsyncStub, deadline_s: float) -> None:
        self._stub = stub
        self._deadline = deadline_s

    async def check(
        self,
        action: str,
        target: authz_pb2.Resource,
        *,
        access_token: str = "",
        subject_id: str = "",
        dimse_peer: str = "",
        context: Mapping[str, str] | None = None,
    ) -> Verdict:
        """``dimse_peer``: a DICOM peer our DIMSE listener admitted, in place of a user."""
        request = authz_pb2.CheckRequest(
            subject=authz_pb2.Subject(id=subject_id, access_token=access_token, dimse_peer=dimse_peer),
            action=action,
            resource=target,
            context=dict(context or {}),
        )
        try:
            answer = await self._stub.Check(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise AuthzUnavailable(exc.code().name) from None
        return _verdict(answer, subject_id)

    async def check_many(
        self, action: str, targets: Sequence[authz_pb2.Resource], *, access_token: str = "", dimse_peer: str = ""
    ) -> list[Verdict]:
        """The same question about each target, in as few calls as authz takes (CheckMany):
        a QIDO page of 100 studies is one round trip, not 100. Verdicts in the targets' order."""
        subject = authz_pb2.Subject(access_token=access_token, dimse_peer=dimse_peer)
        calls = [
            authz_pb2.CheckManyRequest(
                checks=[
                    authz_pb2.CheckRequest(subject=subject, action=action, resource=target)
                    for target in targets[start : start + CHECKS_PER_CALL]
                ]
            )
            for start in range(0, len(targets), CHECKS_PER_CALL)
        ]
        try:
            answers = await asyncio.gather(*(self._stub.CheckMany(call, timeout=self._deadline) for call in calls))
        except grpc.aio.AioRpcError as exc:
            raise AuthzUnavailable(exc.code().name) from None
        verdicts = [_verdict(result, "") for answer in answers for result in answer.results]
        if len(verdicts) != len(targets):
            raise AuthzUnavailable("CheckMany answered a different number of checks")
        return verdicts

    async def break_glass(
        self, access_token: str, study_uid: str, reason: str, patient_ref: str = ""
    ) -> authz_pb2.Grant:
        """Ask authz for an emergency override on one study, or with ``patient_ref`` on every
        study of that patient, on behalf of the token's user."""
        request = authz_pb2.BreakGlassRequest(
            caller=authz_pb2.Subject(access_token=access_token),
            study_instance_uid="" if patient_ref else study_uid,
            patient_ref=patient_ref,
            reason=reason,
        )
        try:
            return await self._stub.BreakGlass(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                # authz's refusal names the rule that failed (no privilege, no MFA, already active),
                # never the patient: safe to hand back to the user.
                raise BreakGlassRefused(exc.details() or "not permitted") from None
            raise AuthzUnavailable(exc.code().name) from None


def _verdict(answer: authz_pb2.CheckResponse, subject_id: str) -> Verdict:
    return Verdict(
        allow=answer.allow,
        reason=answer.reason,
        reason_code=answer.reason_code,
        subject=answer.subject or subject_id,
        roles=tuple(answer.roles),
        obligations=frozenset(answer.obligations),
        decision_id=answer.decision_id,
        policy_version=answer.policy_version,
    )


class BreakGlassRefused(Exception):
    """authz refused the override; the message is its PHI-free reason."""

    @property
    def unauthenticated(self) -> bool:
        return str(self).startswith("unauthenticated")
