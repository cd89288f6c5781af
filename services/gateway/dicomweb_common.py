"""What every DICOMweb route shares: the backends, the caller's token, errors, audit, object reads."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.storage.instance_storer import InstanceStorer
from dicomsafe.v1 import audit_pb2, authz_pb2, crypto_pb2, crypto_pb2_grpc
from services.gateway.access import AccessChecker, AuthzUnavailable, Verdict, Where, resource
from services.gateway.deidentify import Deidentifier
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome

DICOM_JSON = "application/dicom+json"
ERROR_COMMENT = "00000902"


@dataclass(frozen=True)
class Backends:
    access: AccessChecker
    crypto: crypto_pb2_grpc.CryptoServiceAsyncStub
    # STOW-RS: validates, seals (key from crypto) and announces each instance in this process.
    storer: InstanceStorer
    index: StudyIndex
    audit: AuditEmitter
    deidentifier: Deidentifier
    max_instance_bytes: int
    deadline_s: float
    # Path prefix of the DICOMweb root, e.g. "/dicomweb".
    root: str
    # The root as clients reach it (behind an ingress); "" = from the request's Host header.
    public_url: str = ""
    # A response up to this size is authenticated whole before its status is sent (a tampered
    # object then answers 500); a larger one streams and, failing midway, the connection is cut.
    verify_before_send_bytes: int = 64 * 1024 * 1024


class HttpError(Exception):
    """Ends a request with a DICOMweb error: status, a PHI-free comment, optional headers."""

    def __init__(self, status: int, comment: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.headers = dict(headers or {})


def error_response(exc: HttpError) -> Response:
    body = {ERROR_COMMENT: {"vr": "LO", "Value": [exc.comment[:64]]}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers, media_type=DICOM_JSON)


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def base_url(request: Request, backends: Backends) -> str:
    """Where retrieve URLs point: the configured public root, else what the client addressed."""
    if backends.public_url:
        return backends.public_url.rstrip("/")
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}{backends.root}"


def refusal(verdict: Verdict) -> HttpError:
    """The HTTP answer to a deny: 401 to re-authenticate or step up (RFC 6750, RFC 9470), else 403."""
    if verdict.reason_code == "unauthenticated":
        return HttpError(401, "access token rejected", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if verdict.reason_code == "mfa_required":
        return HttpError(
            401,
            "multi-factor authentication required",
            {"WWW-Authenticate": 'Bearer error="insufficient_user_authentication", acr_values="mfa"'},
        )
    return HttpError(403, "not permitted")


# Permanent and server-side (retrying cannot help): 500, not 502/503 which clients retry.
INTEGRITY_COMMENT = "stored object failed its integrity check"

NO_TOKEN = HttpError(401, "access token required", {"WWW-Authenticate": 'Bearer realm="dicomsafe"'})


async def authorise(
    backends: Backends,
    token: str,
    action: str,
    target_kind: str,
    study_uid: str,
    labels: tuple[str, ...],
    where: Where | None = None,
) -> Verdict:
    try:
        target = resource(target_kind, study_uid, labels=labels, where=where)
        return await backends.access.check(action, target, access_token=token)
    except AuthzUnavailable:
        # No decision is a deny; the caller may retry.
        raise HttpError(503, "authorisation unavailable", {"Retry-After": "5"}) from None


async def authorise_many(
    backends: Backends, token: str, action: str, targets: Sequence[authz_pb2.Resource]
) -> list[Verdict]:
    """One decision per target (access.AccessChecker.check_many), in their order."""
    try:
        return await backends.access.check_many(action, targets, access_token=token)
    except AuthzUnavailable:
        raise HttpError(503, "authorisation unavailable", {"Retry-After": "5"}) from None


async def record(
    backends: Backends,
    action: audit_pb2.AuditAction.ValueType,
    outcome: audit_pb2.AuditOutcome.ValueType,
    actor: str,
    *,
    verdict: Verdict | None = None,
    study_uid: str = "",
    sop_uid: str = "",
    object_id: str = "",
    patient_ref: str = "",
    reason: str = "",
    details: Mapping[str, str] | None = None,
) -> None:
    """Audit one DICOMweb outcome; a call whose audit record cannot be written fails (503)."""
    merged = dict(details or {})
    if verdict is not None:
        merged.update(verdict.audit_details())
    try:
        await backends.audit.emit(
            action,
            outcome,
            actor or "unauthenticated",
            actor_roles=list(verdict.roles) if verdict else [],
            study_instance_uid=study_uid,
            sop_instance_uid=sop_uid,
            object_id=object_id,
            patient_ref=patient_ref,
            reason=reason,
            details=merged,
        )
    except Exception as exc:  # noqa: BLE001 - no audit record, no answer
        log.error("audit unavailable", extra={"error": type(exc).__name__})
        raise HttpError(503, "audit unavailable", {"Retry-After": "5"}) from None


OpenCall = grpc.aio.UnaryStreamCall[crypto_pb2.OpenRequest, crypto_pb2.OpenResponse]


def start_open(backends: Backends, object_id: str, subject: str, offset: int = 0, length: int = 0) -> OpenCall:
    """Put the Open call in flight now (Vault unwrap, first chunks) and read it later with relay()."""
    return backends.crypto.Open(
        crypto_pb2.OpenRequest(object_id=object_id, offset=offset, length=length, on_behalf_of=subject),
        timeout=backends.deadline_s,
    )


async def open_range(
    backends: Backends, object_id: str, subject: str, offset: int = 0, length: int = 0
) -> AsyncIterator[bytes]:
    async for piece in relay(start_open(backends, object_id, subject, offset, length), object_id):
        yield piece


async def relay(stream: OpenCall, object_id: str) -> AsyncIterator[bytes]:
    try:
        async for piece in stream:
            yield piece.data
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DATA_LOSS:
            log.error("stored object failed authentication", extra={"object_id": object_id})
        raise


async def read_range(backends: Backends, object_id: str, subject: str, offset: int = 0, length: int = 0) -> bytes:
    try:
        return b"".join([piece async for piece in open_range(backends, object_id, subject, offset, length)])
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise HttpError(404, "instance not found") from None
        raise HttpError(503, f"storage unavailable ({exc.code().name})", {"Retry-After": "5"}) from None
