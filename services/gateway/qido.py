"""QIDO-RS (PS3.18 10.6): search studies, series and instances in the index.

The query itself needs `study.query`; every study in the answer is then checked on its own
(its sensitivity labels, grants scoped to it), and studies the caller may not see are left out.
Under a "deidentify" obligation the identifying attributes are withheld.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.access import Verdict, Where
from services.gateway.dicomweb_common import (
    DICOM_JSON,
    NO_TOKEN,
    Action,
    Backends,
    HttpError,
    Outcome,
    authorise,
    base_url,
    bearer_token,
    record,
    refusal,
)
from services.gateway.index_entry import IDENTIFYING_KEYS
from services.gateway.study_index import Found, Level, QueryError

QUERY_ACTION = "study.query"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
IDENTIFYING_TAGS = frozenset(f"{tag_for_keyword(k):08X}" for k in IDENTIFYING_KEYS)


async def search(
    request: Request, backends: Backends, level: Level, study_uid: str = "", series_uid: str = ""
) -> Response:
    token = bearer_token(request)
    details = {"route": "qido-rs", "level": level}
    if not token:
        await record(
            backends,
            Action.AUDIT_ACTION_STUDY_QUERIED,
            Outcome.AUDIT_OUTCOME_DENIED,
            "",
            reason="no access token",
            details=details,
        )
        raise NO_TOKEN
    params, offset, limit = _parameters(request)
    # The gate proves the token before anything is searched. Only a bad token ends the query here:
    # someone whose grants are scoped (a department, a patient, one study) is denied a query
    # about no study in particular, yet may see studies in scope, which the per-study checks decide.
    gate = await authorise(backends, token, QUERY_ACTION, "study", study_uid, ())
    if not gate.allow and gate.reason_code == "unauthenticated":
        await record(
            backends,
            Action.AUDIT_ACTION_STUDY_QUERIED,
            Outcome.AUDIT_OUTCOME_DENIED,
            gate.subject,
            verdict=gate,
            study_uid=study_uid,
            reason=gate.reason_code or "denied",
            details=details,
        )
        raise refusal(gate)
    try:
        hits = await backends.index.search(
            level, params, study_uid=study_uid, series_uid=series_uid, offset=offset, limit=limit
        )
    except QueryError as exc:
        raise HttpError(400, str(exc)) from None
    visible = await _visible(backends, token, hits)
    base = base_url(request, backends)
    results = [_shaped(level, hit, verdict, base) for hit, verdict in visible]
    await record(
        backends,
        Action.AUDIT_ACTION_STUDY_QUERIED,
        Outcome.AUDIT_OUTCOME_SUCCESS,
        gate.subject,
        verdict=gate,
        study_uid=study_uid,
        details={
            **details,
            # Which keys were used, never their values (they may be PHI).
            "keys": ",".join(sorted(params)),
            "results": str(len(results)),
            "withheld": str(len(hits) - len(results)),
            "studies": ",".join(sorted({hit.study_uid for hit, _ in visible}))[:4000],
        },
    )
    if not results:
        return Response(status_code=204)
    return JSONResponse(results, media_type=DICOM_JSON)


def _parameters(request: Request) -> tuple[dict[str, str], int, int]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.lower() in CONTROL:
            continue
        keyword = name
        if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
            keyword = keyword_for_tag(int(name, 16)) or name
        params[keyword] = value
    try:
        offset = int(request.query_params.get("offset", "0"))
        limit = int(request.query_params.get("limit", str(DEFAULT_LIMIT)))
    except ValueError:
        raise HttpError(400, "limit and offset must be integers") from None
    if offset < 0 or not 0 < limit <= MAX_LIMIT:
        raise HttpError(400, f"limit must be 1..{MAX_LIMIT} and offset not negative")
    return params, offset, limit


async def _visible(backends: Backends, token: str, hits: list[Found]) -> list[tuple[Found, Verdict]]:
    """Each study decided once, with its own labels: grants and sensitivity are per study."""
    verdicts: dict[str, Verdict] = {}
    for hit in hits:
        if hit.study_uid not in verdicts:
            where = Where(hit.site, hit.department, hit.patient_ref)
            verdicts[hit.study_uid] = await authorise(
                backends, token, QUERY_ACTION, "study", hit.study_uid, hit.labels, where
            )
    return [(hit, verdicts[hit.study_uid]) for hit in hits if verdicts[hit.study_uid].allow]


def _shaped(level: Level, hit: Found, verdict: Verdict, base: str) -> dict[str, Any]:
    attrs = dict(hit.attrs)
    if verdict.deidentify:
        for tag in IDENTIFYING_TAGS:
            attrs.pop(tag, None)
    url = f"{base}/studies/{hit.study_uid}"
    if level in ("series", "instance") and "0020000E" in attrs:
        url += f"/series/{attrs['0020000E']['Value'][0]}"
    if level == "instance" and "00080018" in attrs:
        url += f"/instances/{attrs['00080018']['Value'][0]}"
    attrs["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(attrs.items()))
