"""Asking authz about one call: the same question for the gRPC retrieve path and for DICOMweb."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from dicomsafe.v1 import authz_pb2, authz_pb2_grpc

# Obligations this gateway knows how to honour; any other one means the data is not released.
DEIDENTIFY = "deidentify"
HONOURED = frozenset({DEIDENTIFY})


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
    def unhonourable(self) -> frozenset[str]:
        return self.obligations - HONOURED

    def audit_details(self) -> dict[str, str]:
        return {"decision_id": self.decision_id, "policy_version": self.policy_version}


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
        context: Mapping[str, str] | None = None,
    ) -> Verdict:
        request = authz_pb2.CheckRequest(
            subject=authz_pb2.Subject(id=subject_id, access_token=access_token),
            action=action,
            resource=target,
            context=dict(context or {}),
        )
        try:
            answer = await self._stub.Check(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise AuthzUnavailable(exc.code().name) from None
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
