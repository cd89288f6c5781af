"""Break-glass through the gateway: the one way a signed-in user can ask authz for an override.

`POST /api/v1/studies/{study}/break-glass` with the user's bearer token and a JSON body
`{"reason": "..."}`, or `{"reason": "...", "scope": "patient"}` for every study of that study's
patient (prior imaging in an emergency; the patient's pseudonym comes from the study index).
authz decides (the `emergency.access` privilege, MFA, a stated reason, not renewable), audits
the override and raises the security alert; the gateway only relays the user's token, so
nobody can start an override on someone else's behalf. Not part of DICOMweb,
hence its own root and RFC 9457 problem details instead of DICOM JSON errors.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.access import AuthzUnavailable, BreakGlassRefused
from services.gateway.dicomweb_common import Action, Backends, HttpError, Outcome, bearer_token, log, record

PROBLEM_JSON = "application/problem+json"
MAX_REASON = 1000
MAX_BODY = 16 * 1024
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def problem(status: int, title: str, detail: str = "", headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


async def request_override(request: Request, backends: Backends, study: str) -> Response:
    token = bearer_token(request)
    if not token:
        await _record_refusal(backends, study, "no access token")
        return problem(401, "access token required", headers={"WWW-Authenticate": 'Bearer realm="dicomsafe"'})
    if not UID.match(study) or len(study) > 64:
        return problem(400, "not a study instance UID")
    stated = await _reason(request)
    if isinstance(stated, Response):
        return stated
    reason, scope = stated
    patient_ref = ""
    if scope == "patient":
        context = await backends.index.study_context(study)
        if context is None or not context[3]:
            await _record_refusal(backends, study, "patient of the study unknown")
            return problem(404, "no such study", "the study is not indexed, or names no patient")
        patient_ref = context[3]
    try:
        grant = await backends.access.break_glass(token, study, reason, patient_ref)
    except BreakGlassRefused as refused:
        # authz has audited the refusal (with the verified subject) already.
        if refused.unauthenticated:
            return problem(
                401, "access token rejected", str(refused), {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        return problem(403, "break-glass refused", str(refused))
    except AuthzUnavailable as exc:
        log.error("break-glass unavailable", extra={"code": str(exc)})
        return problem(503, "authorisation unavailable", headers={"Retry-After": "5"})
    return JSONResponse(
        {
            "grant_id": grant.grant_id,
            "scope": "patient" if grant.patient_ref else "study",
            "study_instance_uid": grant.study_instance_uid,
            "patient_ref": grant.patient_ref,
            "subject": grant.subject,
            "role": grant.role,
            "not_before": grant.not_before.ToDatetime().isoformat() + "Z",
            "expires_at": grant.not_after.ToDatetime().isoformat() + "Z",
        },
        status_code=201,
    )


async def _reason(request: Request) -> tuple[str, str] | Response:
    """(stated reason, scope) from a JSON body, or the 400/413/415 answer."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return problem(415, "body must be application/json", 'send {"reason": "..."}')
    raw = await request.body()
    if len(raw) > MAX_BODY:
        return problem(413, "body too large")
    try:
        body = json.loads(raw)
    except ValueError:
        return problem(400, "body is not JSON", 'send {"reason": "..."}')
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        return problem(400, "a stated reason is required", 'send {"reason": "..."}')
    if len(reason) > MAX_REASON:
        return problem(400, f"the reason may hold at most {MAX_REASON} characters")
    scope = body.get("scope", "study")
    if scope not in ("study", "patient"):
        return problem(400, 'scope must be "study" or "patient"')
    return reason.strip(), str(scope)


async def _record_refusal(backends: Backends, study: str, reason: str) -> None:
    """A request authz never saw (no token) is still in the trail, as the DICOMweb routes do."""
    try:
        await record(
            backends,
            Action.AUDIT_ACTION_EMERGENCY_OVERRIDE,
            Outcome.AUDIT_OUTCOME_DENIED,
            "",
            study_uid=study,
            reason=reason,
            details={"route": "break-glass"},
        )
    except HttpError:
        # The refusal stands whether or not it could be recorded.
        log.error("break-glass refusal not audited")
