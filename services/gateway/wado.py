"""WADO-RS (PS3.18 10.4): instances, metadata, frames and pixel bulk data of stored studies.

One authz decision per request (the study, with its sensitivity labels), then crypto opens only
the byte ranges the answer needs: the header for metadata, a frame's fragments for frames.
Every instance released is audited before its first byte leaves; a researcher's identified read
is refused and the de-identified read (Annex E basic profile) is offered in its place, addressed
by the pseudonymous UIDs of the release (those QIDO-RS gives a researcher), never the originals.
Instances are served in their stored transfer syntax (406 if another is demanded); frames of a
lossless compressed syntax may be asked for decoded to Explicit VR Little Endian
(services.gateway.transcoding); rendered and thumbnail images (services.gateway.rendering) are
decoded here for identified readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pydicom
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dicomsafe.v1 import audit_pb2
from services.gateway import bulk_data, rendering, transcoding
from services.gateway.access import Verdict, Where
from services.gateway.dicomweb_common import (
    DICOM_JSON,
    INTEGRITY_COMMENT,
    NO_TOKEN,
    Action,
    Backends,
    HttpError,
    OpenCall,
    Outcome,
    authorise,
    base_url,
    bearer_token,
    log,
    open_range,
    record,
    refusal,
    relay,
    start_open,
)
from services.gateway.multipart import MediaType, between, closing, new_boundary, opening, part_header
from services.gateway.study_index import Located

READ = "instance.read"
# The header without pixel data: technologists checking what was stored, PACS administrators.
READ_METADATA = "instance.read_metadata"
READ_DEIDENTIFIED = "instance.read_deidentified"
# Refusals of the de-identified read that still mean "this caller reads de-identified data".
_DEIDENTIFIED_READER_REFUSED = frozenset({"out_of_scope", "mfa_required"})
# Media types of compressed frames (PS3.18 table 8.7.3-2); native frames are application/octet-stream.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"})


@dataclass(frozen=True)
class Release:
    """What the caller may have: the decision and the instances it covers."""

    verdict: Verdict
    instances: list[Located]
    # Addressed by pseudonymous UIDs: served de-identified whatever the policy's obligations say.
    pseudonymous: bool = False

    @property
    def deidentified(self) -> bool:
        return self.verdict.deidentify or self.pseudonymous


async def instances(request: Request, backends: Backends, study: str, series: str = "", sop: str = "") -> Response:
    release = await _release(request, backends, "instance", study, series, sop)
    try:
        wanted = _accepted(request, ("application/dicom",))
        for located in release.instances:
            requested = wanted.get("transfer-syntax", "*")
            if requested not in ("*", located.transfer_syntax_uid):
                raise HttpError(406, "instances are served only in their stored transfer syntax")
    except HttpError as exc:
        raise await _unreleased(backends, release, "instance", exc) from None
    subject = release.verdict.subject
    boundary = new_boundary()
    media_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    if sum(loc.size for loc in release.instances) <= backends.verify_before_send_bytes:
        pieces: list[bytes] = []
        for n, located in enumerate(release.instances):
            pieces.append(opening(boundary) if n == 0 else between(boundary))
            pieces.append(part_header(f"application/dicom; transfer-syntax={located.transfer_syntax_uid}"))
            verified = await _verified(backends, release, located, "instance")
            pieces += [backends.deidentifier.instance(b"".join(verified))] if release.deidentified else verified
        pieces.append(closing(boundary))
        # Audited once everything is authenticated: the trail records no release that did not happen.
        await asyncio.gather(*(_audit_release(backends, release, loc, "instance") for loc in release.instances))
        return _buffered(pieces, media_type)
    # The first instance's Open goes in flight while the release is audited (nothing is sent before
    # the audit records are acknowledged); the records go out together, one broker round trip.
    first = (
        start_open(backends, release.instances[0].object_id, subject)
        if release.instances and not release.deidentified
        else None
    )
    try:
        await asyncio.gather(*(_audit_release(backends, release, loc, "instance") for loc in release.instances))
    except BaseException:
        if first is not None:
            first.cancel()
        raise

    async def body() -> AsyncIterator[bytes]:
        for n, located in enumerate(release.instances):
            yield opening(boundary) if n == 0 else between(boundary)
            yield part_header(f"application/dicom; transfer-syntax={located.transfer_syntax_uid}")
            if release.deidentified:
                data = b"".join(await _verified(backends, release, located, "instance"))
                yield backends.deidentifier.instance(data)
                continue
            stream = first if n == 0 and first is not None else start_open(backends, located.object_id, subject)
            async for piece in _relayed(backends, release, located, stream, "instance"):
                yield piece
        yield closing(boundary)

    return StreamingResponse(body(), media_type=media_type)


async def metadata(request: Request, backends: Backends, study: str, series: str = "", sop: str = "") -> Response:
    release = await _release(request, backends, "metadata", study, series, sop)
    base = base_url(request, backends)
    out = []
    headers = [
        b"".join(await _verified(backends, release, loc, "metadata", ((0, loc.layout.header_length),)))
        for loc in release.instances
    ]
    # Audited once every header is authenticated: a tampered one leaves a failure, no success.
    await asyncio.gather(*(_audit_release(backends, release, loc, "metadata") for loc in release.instances))
    for located, header in zip(release.instances, headers, strict=True):
        ds = pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True)
        if release.deidentified:
            # No bulk data is released de-identified: what the profile keeps goes inline.
            backends.deidentifier.dataset(ds)
            out.append(ds.to_json_dict(bulk_data_threshold=1 << 62, bulk_data_element_handler=None))
            continue
        instance_uri = f"{base}/studies/{study}/series/{located.series_uid}/instances/{located.sop_uid}"
        attrs = ds.to_json_dict(
            bulk_data_threshold=bulk_data.PYDICOM_THRESHOLD,
            bulk_data_element_handler=bulk_data.uri_handler(ds, instance_uri),
        )
        if located.layout.pixel_data:
            attrs["7FE00010"] = {
                "vr": "OB" if located.layout.encapsulated else "OW",
                "BulkDataURI": f"{instance_uri}/bulkdata/7fe00010",
            }
        out.append(attrs)
    return JSONResponse(out, media_type=DICOM_JSON)


async def frames(request: Request, backends: Backends, study: str, series: str, sop: str, frame_list: str) -> Response:
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError:
        raise HttpError(400, "frame numbers must be integers") from None
    if not numbers or min(numbers) < 1:
        raise HttpError(400, "frame numbers start at 1")
    release = await _release(request, backends, "frames", study, series, sop)
    located = release.instances[0]
    layout = located.layout
    ts = located.transfer_syntax_uid
    media = "application/octet-stream" if ts in NATIVE else FRAME_MEDIA.get(ts, "application/octet-stream")
    try:
        if release.deidentified:
            raise HttpError(403, "frames are not released under de-identification")
        if not layout.frames:
            raise HttpError(406, "this instance's frames cannot be served separately")
        if max(numbers) > len(layout.frames):
            raise HttpError(404, "no such frame")
        decode = _frames_decoded(request, media, ts)
        if decode and located.size > backends.verify_before_send_bytes:
            # Decoding needs the whole instance in memory: bounded like every buffered response.
            raise HttpError(406, "instance too large to decode here: ask for its stored transfer syntax")
    except HttpError as exc:
        raise await _unreleased(backends, release, f"frames:{frame_list}", exc) from None
    boundary = new_boundary()
    part = f"frames:{frame_list}"
    if decode:
        return await _decoded_frames(backends, release, located, part, numbers, boundary)
    media_type = f'multipart/related; type="{media}"; boundary={boundary}'
    wanted = [span for number in numbers for span in layout.frames[number - 1]]
    if sum(length for _, length in wanted) <= backends.verify_before_send_bytes:
        pieces: list[bytes] = []
        for n, number in enumerate(numbers):
            pieces.append(opening(boundary) if n == 0 else between(boundary))
            pieces.append(part_header(f"{media}; transfer-syntax={ts}"))
            pieces += await _verified(backends, release, located, part, layout.frames[number - 1])
        pieces.append(closing(boundary))
        await _audit_release(backends, release, located, part)
        return _buffered(pieces, media_type)
    await _audit_release(backends, release, located, part)

    async def body() -> AsyncIterator[bytes]:
        for n, number in enumerate(numbers):
            yield opening(boundary) if n == 0 else between(boundary)
            yield part_header(f"{media}; transfer-syntax={ts}")
            for offset, length in layout.frames[number - 1]:
                async for piece in open_range(backends, located.object_id, release.verdict.subject, offset, length):
                    yield piece
        yield closing(boundary)

    return StreamingResponse(body(), media_type=media_type)


def _frames_decoded(request: Request, media: str, ts: str) -> bool:
    """Whether Accept asks for the frames decoded to native (else as stored; 406 if neither)."""
    try:
        _accepted(request, (media, "application/octet-stream") if ts not in NATIVE else (media,), ts)
        return False
    except HttpError:
        if ts not in transcoding.DECODED_TO_NATIVE:
            raise
    try:
        _accepted(request, ("application/octet-stream",), transcoding.EXPLICIT_LE)
    except HttpError:
        raise HttpError(406, f"frames are served as stored ({ts}) or decoded to {transcoding.EXPLICIT_LE}") from None
    return True


async def _decoded_frames(
    backends: Backends, release: Release, located: Located, part: str, numbers: list[int], boundary: str
) -> Response:
    """Frames decoded from the whole instance (authenticated before anything is decoded or sent)."""
    data = b"".join(await _verified(backends, release, located, part))
    try:
        decoded = await asyncio.to_thread(transcoding.native_frames, data, numbers)
    except HttpError as exc:
        raise await _unreleased(backends, release, part, exc) from None
    header = part_header(f"application/octet-stream; transfer-syntax={transcoding.EXPLICIT_LE}")
    pieces: list[bytes] = []
    for n, frame in enumerate(decoded):
        pieces += [opening(boundary) if n == 0 else between(boundary), header, frame]
    pieces.append(closing(boundary))
    await _audit_release(backends, release, located, part)
    return _buffered(pieces, f'multipart/related; type="application/octet-stream"; boundary={boundary}')


async def pixel_bulkdata(request: Request, backends: Backends, study: str, series: str, sop: str) -> Response:
    release = await _release(request, backends, "bulkdata", study, series, sop)
    located = release.instances[0]
    try:
        if release.deidentified:
            raise HttpError(403, "bulk data is not released under de-identification")
        if located.layout.pixel_data is None:
            raise HttpError(404, "instance has no pixel data served as bulk data")
    except HttpError as exc:
        raise await _unreleased(backends, release, "bulkdata", exc) from None
    offset, length = located.layout.pixel_data
    boundary = new_boundary()
    bulk_type = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    if length <= backends.verify_before_send_bytes:
        pieces = [
            opening(boundary),
            part_header(f"application/octet-stream; transfer-syntax={located.transfer_syntax_uid}"),
        ]
        pieces += await _verified(backends, release, located, "bulkdata", ((offset, length),))
        pieces.append(closing(boundary))
        await _audit_release(backends, release, located, "bulkdata")
        return _buffered(pieces, bulk_type)
    await _audit_release(backends, release, located, "bulkdata")

    async def body() -> AsyncIterator[bytes]:
        yield opening(boundary)
        yield part_header(f"application/octet-stream; transfer-syntax={located.transfer_syntax_uid}")
        async for piece in open_range(backends, located.object_id, release.verdict.subject, offset, length):
            yield piece
        yield closing(boundary)

    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    )


async def header_bulkdata(
    request: Request, backends: Backends, study: str, series: str, sop: str, path: str
) -> Response:
    """A large binary value of the header, named by the BulkDataURI metadata gave (bulk_data)."""
    wanted = bulk_data.parse_path(path)
    if wanted == [0x7FE00010]:
        # The pixel data's route, whatever the case of its hex digits.
        return await pixel_bulkdata(request, backends, study, series, sop)
    part = f"bulkdata:{path.strip('/')}"
    release = await _release(request, backends, part, study, series, sop)
    located = release.instances[0]
    try:
        if release.deidentified:
            raise HttpError(403, "bulk data is not released under de-identification")
        _accepted(request, ("application/octet-stream",))
        header = b"".join(await _verified(backends, release, located, part, ((0, located.layout.header_length),)))
        ds = pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True)
        value = bulk_data.value_at(ds, wanted)
    except HttpError as exc:
        raise await _unreleased(backends, release, part, exc) from None
    boundary = new_boundary()
    pieces = [opening(boundary), part_header("application/octet-stream"), value, closing(boundary)]
    await _audit_release(backends, release, located, part)
    return _buffered(pieces, f'multipart/related; type="application/octet-stream"; boundary={boundary}')


async def rendered(
    request: Request, backends: Backends, study: str, series: str, sop: str, frame: str = "1"
) -> Response:
    """An instance's frame (the first unless named) as image/jpeg or image/png."""
    if not frame.isdigit() or int(frame) < 1:
        raise HttpError(400, "one frame number, from 1")
    part = f"rendered:{frame}"
    release = await _release(request, backends, part, study, series, sop)
    return await _image(request, backends, release, release.instances[0], part, int(frame), thumbnail=False)


async def thumbnail(request: Request, backends: Backends, study: str, series: str = "", sop: str = "") -> Response:
    """A small image standing for a study, series or instance: the middle instance of the first
    series (of the series), its first frame."""
    release = await _release(request, backends, "thumbnail", study, series, sop)
    first_series = [loc for loc in release.instances if loc.series_uid == release.instances[0].series_uid]
    chosen = first_series[len(first_series) // 2]
    return await _image(request, backends, release, chosen, "thumbnail", 1, thumbnail=True)


async def _image(
    request: Request, backends: Backends, release: Release, located: Located, part: str, frame: int, thumbnail: bool
) -> Response:
    try:
        if release.deidentified:
            # Pixels can carry burned-in identifiers that de-identification of the header misses.
            raise HttpError(403, "rendered images are not released under de-identification")
        wanted = rendering.parse_request(
            request.headers.get("accept", ""), dict(request.query_params), thumbnail=thumbnail
        )
        data = b"".join(await _verified(backends, release, located, part))
        image = await asyncio.to_thread(rendering.render, data, frame, wanted)
    except HttpError as exc:
        raise await _unreleased(backends, release, part, exc) from None
    await _audit_release(backends, release, located, part)
    return Response(image, media_type=wanted.media, headers={"Cache-Control": "private, no-store"})


async def uri(request: Request, backends: Backends) -> Response:
    """WADO-URI (PS3.18 chapter 9): one instance as ``application/dicom``, the form reporting
    systems and older viewers still link to. Same decision, audit and de-identification as
    WADO-RS; no rendering, so other content types are 406."""
    query = request.query_params
    if query.get("requestType") != "WADO":
        raise HttpError(400, "requestType must be WADO")
    study, series, sop = (query.get(key, "").strip() for key in ("studyUID", "seriesUID", "objectUID"))
    if not (study and series and sop):
        raise HttpError(400, "studyUID, seriesUID and objectUID are required")
    release = await _release(request, backends, "wado-uri", study, series, sop)
    located = release.instances[0]
    try:
        # Without contentType the standard's default for images is a rendered JPEG, not served.
        wanted = {t.strip().split(";")[0] for t in query.get("contentType", "").split(",")}
        if "application/dicom" not in wanted:
            raise HttpError(406, "only contentType=application/dicom is served (no rendered images)")
        syntax = query.get("transferSyntax", "").strip()
        if syntax and syntax != located.transfer_syntax_uid:
            raise HttpError(406, "instances are served only in their stored transfer syntax")
    except HttpError as exc:
        raise await _unreleased(backends, release, "wado-uri", exc) from None
    subject = release.verdict.subject
    if release.deidentified or located.size <= backends.verify_before_send_bytes:
        pieces = await _verified(backends, release, located, "wado-uri")
        await _audit_release(backends, release, located, "wado-uri")
        if release.deidentified:
            return Response(backends.deidentifier.instance(b"".join(pieces)), media_type="application/dicom")
        return _buffered(pieces, "application/dicom")
    await _audit_release(backends, release, located, "wado-uri")
    stream = start_open(backends, located.object_id, subject)
    return StreamingResponse(_relayed(backends, release, located, stream, "wado-uri"), media_type="application/dicom")


async def _release(request: Request, backends: Backends, part: str, study: str, series: str, sop: str) -> Release:
    token = bearer_token(request)
    details = {"route": "wado-rs", "part": part}
    if not token:
        await record(
            backends,
            Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
            Outcome.AUDIT_OUTCOME_DENIED,
            "",
            study_uid=study,
            sop_uid=sop,
            reason="no access token",
            details=details,
        )
        raise NO_TOKEN
    located = await backends.index.locate(study, series, sop)
    # Not an indexed UID: maybe the pseudonymous one of a de-identified release (what QIDO gave a
    # researcher). Those are only ever served de-identified, whoever asks.
    pseudonymous = False
    if not located:
        located = await backends.index.locate_pseudonymous(study, series, sop)
        pseudonymous = bool(located)
    labels = located[0].labels if located else ()
    where = Where(located[0].site, located[0].department, located[0].patient_ref) if located else Where()
    real_study = located[0].study_uid if located else study
    refused_as_deidentified = False
    if pseudonymous:
        verdict = await authorise(backends, token, READ_DEIDENTIFIED, "study", real_study, labels, where)
    else:
        identified = READ_METADATA if part == "metadata" else READ
        verdict = await authorise(backends, token, identified, "study", study, labels, where)
        if not verdict.allow and verdict.reason_code not in ("unauthenticated", "mfa_required"):
            # Researchers hold only the de-identified read: offer it in place of the identified one.
            fallback = await authorise(backends, token, READ_DEIDENTIFIED, "study", study, labels, where)
            if fallback.allow:
                verdict = fallback
            elif fallback.reason_code in _DEIDENTIFIED_READER_REFUSED:
                # Refused for this study's labels or scope, a de-identified reader still gets the
                # 404 below: a 403 would confirm that the original UID exists, and hint why.
                verdict, refused_as_deidentified = fallback, True

    async def audit_ending(
        reason: str, outcome: Outcome.ValueType = Outcome.AUDIT_OUTCOME_DENIED, patient_ref: str = "", status: str = ""
    ) -> None:
        """The trail's record of this request ending here, without a release."""
        await record(
            backends,
            Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
            outcome,
            verdict.subject,
            verdict=verdict,
            study_uid=study,
            sop_uid=sop,
            patient_ref=patient_ref,
            reason=reason,
            details={**details, "status": status} if status else details,
        )

    if ((verdict.allow and verdict.deidentify) or refused_as_deidentified) and located and not pseudonymous:
        # A de-identified caller addresses only pseudonymous UIDs: an original UID answered would
        # link it to its pseudonym. Answered as if there were nothing there.
        await audit_ending("original UIDs under de-identification")
        raise HttpError(404, "no such study, series or instance")
    if verdict.allow and verdict.unhonourable:
        await audit_ending("unsupported obligation")
        raise HttpError(403, "not permitted")
    if not verdict.allow:
        await audit_ending(verdict.reason_code or "denied", patient_ref=located[0].patient_ref if located else "")
        raise refusal(verdict)
    if not located:
        # Allowed to ask, and nothing there: still an access attempt for the trail.
        await audit_ending("not found", Outcome.AUDIT_OUTCOME_FAILURE, status="404")
        raise HttpError(404, "no such study, series or instance")
    return Release(verdict, located, pseudonymous)


async def _unreleased(backends: Backends, release: Release, part: str, error: HttpError) -> HttpError:
    """Audit an allowed request that ends without a release (404, 406, a researcher's frames)."""
    # A refusal by rule is a denial; a request that cannot be answered (nothing there, a media
    # type or syntax not served) is a failure. Either way the trail says why, never a value.
    outcome = Outcome.AUDIT_OUTCOME_DENIED if error.status == 403 else Outcome.AUDIT_OUTCOME_FAILURE
    located = release.instances[0] if len(release.instances) == 1 else None
    await record(
        backends,
        Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome,
        release.verdict.subject,
        verdict=release.verdict,
        study_uid=release.instances[0].study_uid if release.instances else "",
        sop_uid=located.sop_uid if located else "",
        object_id=located.object_id if located else "",
        patient_ref=release.instances[0].patient_ref if release.instances else "",
        reason=error.comment,
        details={
            "route": "wado-rs",
            "part": part,
            "status": str(error.status),
            "deidentified": str(release.deidentified).lower(),
        },
    )
    return error


def _accepted(request: Request, types: Sequence[str], ts: str = "") -> dict[str, str]:
    """The first acceptable multipart/related entry of Accept, or 406."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return {}
    for entry in accept.split(","):
        media = MediaType.parse(entry)
        if media.type in ("*/*", "multipart/*"):
            return {}
        if media.type != "multipart/related":
            continue
        inner = media.params.get("type", types[0])
        syntax = media.params.get("transfer-syntax", "*")
        if (inner in types or inner in ("*/*", "*")) and (not ts or syntax in ("*", ts)):
            return dict(media.params)
    raise HttpError(406, f'acceptable: multipart/related; type="{types[0]}"')


async def _audit_release(
    backends: Backends,
    release: Release,
    located: Located,
    part: str,
    outcome: audit_pb2.AuditOutcome.ValueType = Outcome.AUDIT_OUTCOME_SUCCESS,
    reason: str = "",
) -> None:
    await record(
        backends,
        Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome,
        release.verdict.subject,
        verdict=release.verdict,
        study_uid=located.study_uid,
        sop_uid=located.sop_uid,
        object_id=located.object_id,
        patient_ref=located.patient_ref,
        reason=reason,
        details={"route": "wado-rs", "part": part, "deidentified": str(release.deidentified).lower()},
    )
    if outcome == Outcome.AUDIT_OUTCOME_SUCCESS:
        backends.index.note_access(located.study_uid)


async def _verified(
    backends: Backends, release: Release, located: Located, part: str, spans: Sequence[tuple[int, int]] = ((0, 0),)
) -> list[bytes]:
    """The spans of one instance, read and authenticated whole before anything is sent: a
    tampered object then answers 500 with a status, never a 200 cut off midway."""
    pieces: list[bytes] = []
    try:
        for offset, length in spans:
            pieces += [
                p async for p in open_range(backends, located.object_id, release.verdict.subject, offset, length)
            ]
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DATA_LOSS:
            failure = Outcome.AUDIT_OUTCOME_FAILURE
            await _audit_release(backends, release, located, part, failure, INTEGRITY_COMMENT)
            raise HttpError(500, INTEGRITY_COMMENT) from None
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise HttpError(404, "instance not found") from None
        raise HttpError(503, f"storage unavailable ({exc.code().name})", {"Retry-After": "5"}) from None
    return pieces


def _buffered(pieces: list[bytes], media_type: str) -> Response:
    # Content-Length too: a client can tell a cut response from a complete one without multipart.
    length = str(sum(len(p) for p in pieces))

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return StreamingResponse(body(), media_type=media_type, headers={"Content-Length": length})


async def _relayed(
    backends: Backends, release: Release, located: Located, stream: OpenCall, part: str
) -> AsyncIterator[bytes]:
    """A whole stored instance as crypto opens it; a stream that fails midway is on the trail."""
    try:
        async for piece in relay(stream, located.object_id):
            yield piece
    except grpc.aio.AioRpcError as exc:
        log.error("instance stream failed", extra={"object_id": located.object_id, "code": exc.code().name})
        # Already streaming: the status line is gone, so a failed audit write is only logged.
        with contextlib.suppress(HttpError):
            failure = Outcome.AUDIT_OUTCOME_FAILURE
            await _audit_release(backends, release, located, part, failure, f"open failed ({exc.code().name})")
        raise
