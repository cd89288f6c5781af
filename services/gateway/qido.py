"""QIDO-RS (PS3.18 10.6): search studies, series and instances in the index.

The query itself needs `study.query`; every study in the answer is then checked on its own
(its sensitivity labels, grants scoped to it), and studies the caller may not see are left out.

Under a "deidentify" obligation the query is a de-identified one: it may match only on attributes
the Annex E basic profile keeps, UIDs are the pseudonymous ones of de-identified releases (mapped
back through the index), and every result goes through the profile as a released instance does —
so what a researcher finds is what they can retrieve, and nothing in it leads back to the patient.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import keyword_for_tag
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway.access import Verdict, Where, resource
from services.gateway.deidentify import PSEUDONYMOUS, WITHHELD, Deidentifier, matching_treatment
from services.gateway.dicomweb_common import (
    DICOM_JSON,
    NO_TOKEN,
    Action,
    Backends,
    HttpError,
    Outcome,
    authorise,
    authorise_many,
    base_url,
    bearer_token,
    record,
    refusal,
)
from services.gateway.study_index import Found, Level, QueryError

QUERY_ACTION = "study.query"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
UID_LEVEL = {"StudyInstanceUID": "study", "SeriesInstanceUID": "series", "SOPInstanceUID": "instance"}


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
            study_uid=study_uid,
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
    deidentified = gate.allow and gate.deidentify
    query: tuple[dict[str, str], str, str] | None = (params, study_uid, series_uid)
    if deidentified:
        try:
            query = await _real_query(backends, params, study_uid, series_uid)
        except HttpError as exc:
            # A researcher matching on a patient's identifiers is worth a privacy officer's look.
            await record(
                backends,
                Action.AUDIT_ACTION_STUDY_QUERIED,
                Outcome.AUDIT_OUTCOME_DENIED,
                gate.subject,
                verdict=gate,
                reason="withheld matching key",
                details={**details, "keys": ",".join(sorted(params)), "deidentified": "true"},
            )
            raise exc from None
    fuzzy = request.query_params.get("fuzzymatching", "").lower() == "true"
    hits = [] if query is None else await _search(backends, level, *query, offset, limit, fuzzy)
    visible = await _visible(backends, token, hits, deidentified)
    base = base_url(request, backends)
    results = [_shaped(level, hit, base, backends.deidentifier if deidentified else None) for hit, _ in visible]
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
            "deidentified": str(deidentified).lower(),
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


async def _search(
    backends: Backends,
    level: Level,
    params: dict[str, str],
    study_uid: str,
    series_uid: str,
    offset: int,
    limit: int,
    fuzzy: bool = False,
) -> list[Found]:
    try:
        return await backends.index.search(
            level, params, study_uid=study_uid, series_uid=series_uid, offset=offset, limit=limit, fuzzy=fuzzy
        )
    except QueryError as exc:
        raise HttpError(400, str(exc)) from None


async def _real_query(
    backends: Backends, params: dict[str, str], study_uid: str, series_uid: str
) -> tuple[dict[str, str], str, str] | None:
    """A de-identified query in terms of the index: refused keys (400), pseudonymous UIDs mapped back.

    None when a pseudonymous UID names nothing indexed: the answer is empty (never "match all").
    """
    for keyword, value in sorted(params.items()):
        # An empty value only asks for the attribute to be returned (de-identified like the rest).
        if value.strip() and matching_treatment(keyword) == WITHHELD:
            raise HttpError(400, f"{keyword} is not matchable in de-identified queries")
    real = dict(params)
    for keyword, value in params.items():
        level = UID_LEVEL.get(keyword)
        if level is None or matching_treatment(keyword) != PSEUDONYMOUS or not value.strip():
            continue
        pseudonyms = [u.strip() for u in value.replace("\\", ",").split(",") if u.strip()]
        uids = await backends.index.real_uids(level, pseudonyms)
        if not uids:
            return None
        real[keyword] = ",".join(uids)
    paths: list[str] = []
    for level, uid in (("study", study_uid), ("series", series_uid)):
        found = await backends.index.real_uids(level, [uid]) if uid else [""]
        if not found:
            return None
        paths.append(found[0])
    return real, paths[0], paths[1]


async def _visible(
    backends: Backends, token: str, hits: list[Found], deidentified: bool
) -> list[tuple[Found, Verdict]]:
    """Each study decided once, with its own labels: grants and sensitivity are per study.

    A study the caller may see only de-identified is left out of an identified query: its keys
    (patient name, real UIDs) would have matched on what the caller must not learn.
    """
    first: dict[str, Found] = {}
    for hit in hits:
        first.setdefault(hit.study_uid, hit)
    # One CheckMany for the page (a page of 100 studies was 100 Check calls): each study still
    # decided and audited on its own by authz.
    targets = [
        resource("study", hit.study_uid, labels=hit.labels, where=Where(hit.site, hit.department, hit.patient_ref))
        for hit in first.values()
    ]
    decided = await authorise_many(backends, token, QUERY_ACTION, targets) if targets else []
    verdicts = dict(zip(first, decided, strict=True))
    return [
        (hit, verdict)
        for hit in hits
        if (verdict := verdicts[hit.study_uid]).allow and (deidentified or not verdict.deidentify)
    ]


def _shaped(level: Level, hit: Found, base: str, deidentifier: Deidentifier | None) -> dict[str, Any]:
    attrs = dict(hit.attrs)
    study_uid = hit.study_uid
    if deidentifier is not None:
        attrs = deidentifier.query_result(attrs)
        study_uid = deidentifier.pseudonymous_uid(study_uid)
    url = f"{base}/studies/{study_uid}"
    if level in ("series", "instance") and "0020000E" in attrs:
        url += f"/series/{attrs['0020000E']['Value'][0]}"
    if level == "instance" and "00080018" in attrs:
        url += f"/instances/{attrs['00080018']['Value'][0]}"
    attrs["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(attrs.items()))
