"""STOW-RS (PS3.18 10.5): a multipart/related upload, stored instance by instance.

Each part is checked against authz (`instance.store` on its study, once per study per request),
then stored here, where its bytes already are, on the same validation, sealing (a key from
crypto's PrepareSeal) and announcement path as the Kafka topic (dicomsafe.storage.instance_storer).
The response lists every instance as stored (ReferencedSOPSequence) or failed with a reason
(FailedSOPSequence), so one bad file never hides the fate of the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

from pydicom.errors import InvalidDicomError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicomsafe.common.kafka import TransientError
from dicomsafe.dicom.validation import META_CLASS_MISMATCH, InvalidInstance, ParsedInstance, parse_instance
from dicomsafe.storage.instance_storer import DUPLICATE, Refused, StoreContext
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
    log,
    record,
    refusal,
)
from services.gateway.index_entry import IndexEntry, entry_for, sensitivity_labels
from services.gateway.instance_layout import InstanceLayout, LayoutError, layout_from, read_header
from services.gateway.multipart import MediaType, MultipartError, Part, PartTooLarge, parse_parts

STORE_ACTION = "instance.store"
STOW_SOURCE = "gateway/stow-rs"

# PS3.4 / PS3.18 failure reasons.
CANNOT_UNDERSTAND = 0xC000
NOT_AUTHORISED = 0x0124
STUDY_MISMATCH = 0xA900
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
# PS3.7 C.4.2: another instance with this SOP Instance UID (and other content) is already stored.
DUPLICATE_SOP_INSTANCE = 0x0111
# PS3.18 warning reason: stored, but the file meta names another SOP Class than the dataset.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
_REFUSAL_REASONS = {DUPLICATE: DUPLICATE_SOP_INSTANCE, "oversized": OUT_OF_RESOURCES}

# Parts stored at once per request, and the bytes they may hold together.
IN_FLIGHT_PARTS = 8
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# Stored instances indexed in one bulk write at most. Each one's dicom.stored event races its index
# write (the indexer reads back through crypto what it does not find indexed), so a request is not
# indexed only at its end: whenever no part is left storing (a slow client) or this many wait.
INDEX_CHUNK = 2 * IN_FLIGHT_PARTS
# The stored-at of an object that was already stored: sealed at some unknown earlier time.
_LONG_AGO = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


async def store(request: Request, backends: Backends, study_uid: str = "") -> Response:
    token = bearer_token(request)
    if not token:
        await record(
            backends,
            Action.AUDIT_ACTION_INSTANCE_REJECTED,
            Outcome.AUDIT_OUTCOME_DENIED,
            "",
            reason="no access token",
            details={"route": "stow-rs"},
        )
        raise NO_TOKEN
    media = MediaType.parse(request.headers.get("content-type", ""))
    if media.type != "multipart/related" or media.params.get("type", "application/dicom") != "application/dicom":
        raise HttpError(415, 'expected multipart/related; type="application/dicom"')
    request_id = str(uuid.uuid4())
    upload = StowUpload(backends, token, study_uid, request_id, base_url(request, backends))
    try:
        async for part in parse_parts(request.stream(), media.params.get("boundary", ""), backends.max_instance_bytes):
            await upload.add(part)
    except PartTooLarge:
        raise HttpError(413, f"an instance exceeds {backends.max_instance_bytes} bytes") from None
    except MultipartError as exc:
        raise HttpError(400, str(exc)) from None
    finally:
        # Parts already handed on finish either way: a store in progress is never abandoned.
        await upload.finish()
    return upload.response()


class StowUpload:
    """Stores parts concurrently while the body is still arriving: a study's instances overlap their
    Vault, fsync and Kafka round trips. In-flight parts are bounded in number and in bytes."""

    def __init__(self, backends: Backends, token: str, study_uid: str, request_id: str, base: str) -> None:
        self._b = backends
        self._token = token
        self._study_uid = study_uid
        self._request_id = request_id
        self._base = base
        self._verdicts: dict[str, asyncio.Future[Verdict]] = {}
        self._stored: list[dict[str, Any]] = []
        self._entries: list[IndexEntry] = []
        self._failed: list[dict[str, Any]] = []
        self._warned = False
        self._parts = 0
        self._storing = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Condition()
        self._in_flight_bytes = 0

    async def add(self, part: Part) -> None:
        """Start storing a part once there is room (a part larger than the budget goes alone)."""
        self._parts += 1
        size = len(part.body)
        async with self._room:
            await self._room.wait_for(
                lambda: (
                    not self._tasks
                    or (len(self._tasks) < IN_FLIGHT_PARTS and self._in_flight_bytes + size <= IN_FLIGHT_BYTES)
                )
            )
            self._in_flight_bytes += size
        self._storing += 1
        task = asyncio.create_task(self._store(part, self._parts))
        self._tasks.add(task)
        task.add_done_callback(lambda t: asyncio.ensure_future(self._release(t, size)))

    async def finish(self) -> None:
        """Wait for the parts in flight and for the index writes of what they stored: the response
        goes out only after its instances are indexed, since a viewer may query them right away."""
        try:
            while self._tasks:
                await asyncio.gather(*self._tasks)
        finally:
            await self._index()

    async def _index(self) -> None:
        # Taken whole: parts finishing meanwhile start the next chunk.
        entries, self._entries = self._entries, []
        if not entries:
            return
        try:
            await self._b.index.add_many(entries)
        except Exception as exc:  # noqa: BLE001 - the dicom.stored consumer indexes them later
            log.warning("index update deferred", extra={"instances": len(entries), "error": type(exc).__name__})

    async def _release(self, task: asyncio.Task[None], size: int) -> None:
        async with self._room:
            self._tasks.discard(task)
            self._in_flight_bytes -= size
            self._room.notify_all()

    async def _store(self, part: Part, number: int) -> None:
        try:
            await self._store_part(part, number)
        finally:
            self._storing -= 1
        # Whichever part finishes last indexes what the others left waiting.
        if not self._storing or len(self._entries) >= INDEX_CHUNK:
            await self._index()

    async def _store_part(self, part: Part, number: int) -> None:
        if MediaType.parse(part.content_type or "application/dicom").type != "application/dicom":
            self._fail("", "", CANNOT_UNDERSTAND)
            return
        parsed: ParsedInstance | None = None
        invalid: Refused | None = None
        try:
            try:
                parsed = parse_instance(part.body, self._b.max_instance_bytes)
                ds, header_end = parsed.dataset, parsed.header_end
            except InvalidInstance as exc:
                # Refused whatever it holds; its header, when it has one, names the study the
                # refusal is authorised and recorded against, as for any other refusal.
                invalid = Refused(exc.code, exc.reason)
                ds, header_end = read_header(part.body)
            sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
        except (InvalidDicomError, AttributeError, EOFError, ValueError, KeyError, TypeError):
            self._fail("", "", CANNOT_UNDERSTAND)
            return
        if self._study_uid and study_uid != self._study_uid:
            self._fail(sop_class, sop_uid, STUDY_MISMATCH)
            return
        where = Where(str(ds.get("InstitutionName", "") or ""), str(ds.get("InstitutionalDepartmentName", "") or ""))
        verdict = await self._verdict(study_uid, sensitivity_labels(ds), where)
        if not verdict.allow:
            self._fail(sop_class, sop_uid, NOT_AUTHORISED)
            return
        # Taken before the seal, so never later than it: an erasure racing this store errs toward
        # removing the entry, never toward keeping names whose images no longer open.
        sent_at = dt.datetime.now(dt.UTC)
        request_id = f"{self._request_id}/{number}"
        ctx = StoreContext(
            source=STOW_SOURCE,
            request_id=request_id,
            trace_id=self._request_id,
            actor=verdict.subject,
            position=f"{STOW_SOURCE}/{request_id}",
        )
        try:
            if invalid is not None:
                raise invalid
            instance = await self._b.storer.store(part.body, ctx, self._b.max_instance_bytes, parsed)
        except Refused as exc:
            try:
                await self._b.storer.record_refusal(ctx, exc)
            except TransientError:
                # Not stored and its refusal not yet on record: the client may send it again.
                self._fail(sop_class, sop_uid, PROCESSING_FAILURE)
                return
            self._fail(sop_class, sop_uid, _REFUSAL_REASONS.get(exc.code, CANNOT_UNDERSTAND))
            return
        except TransientError as exc:
            # Nothing was stored for this part; the client may send it again (stores are idempotent).
            log.warning("store deferred", extra={"request_id": request_id, "reason": str(exc)})
            self._fail(sop_class, sop_uid, PROCESSING_FAILURE)
            return
        stored = instance.event
        try:
            layout = layout_from(part.body, ds, header_end)
        except LayoutError:
            # Stored and sealed; without a layout it is served only as a whole instance.
            layout = InstanceLayout(0, None, (), False)
        # An object stored earlier was sealed at an unknown earlier time: as old as can be.
        stored_at = _LONG_AGO if stored.redelivery else sent_at
        try:
            self._entries.append(
                entry_for(ds, layout, stored.object_id, stored.plaintext_size, instance.patient_ref, stored_at)
            )
        except Exception as exc:  # noqa: BLE001 - the dicom.stored consumer indexes it later
            log.warning("index update deferred", extra={"object_id": stored.object_id, "error": type(exc).__name__})
        item: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [stored.sop_class_uid]},
            "00081155": {"vr": "UI", "Value": [stored.sop_instance_uid]},
            "00081190": {
                "vr": "UR",
                "Value": [
                    f"{self._base}/studies/{stored.study_instance_uid}/series/{stored.series_instance_uid}"
                    f"/instances/{stored.sop_instance_uid}"
                ],
            },
        }
        if META_CLASS_MISMATCH in stored.warnings:
            item["00081196"] = {"vr": "US", "Value": [DATASET_DOES_NOT_MATCH_SOP_CLASS]}
            self._warned = True
        self._stored.append(item)

    def response(self) -> Response:
        body: dict[str, Any] = {}
        if self._study_uid:
            body["00081190"] = {"vr": "UR", "Value": [f"{self._base}/studies/{self._study_uid}"]}
        if self._stored:
            body["00081199"] = {"vr": "SQ", "Value": self._stored}
        if self._failed:
            body["00081198"] = {"vr": "SQ", "Value": self._failed}
        if not self._parts:
            raise HttpError(400, "no instances in the request")
        # PS3.18 10.5.3: 202 when some instances failed or were stored with a warning.
        status = 200 if not (self._failed or self._warned) else (202 if self._stored else 409)
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)

    async def _verdict(self, study_uid: str, labels: tuple[str, ...], where: Where) -> Verdict:
        """One decision per study per request, shared by that study's parts in flight."""
        if study_uid not in self._verdicts:
            self._verdicts[study_uid] = asyncio.ensure_future(self._decide(study_uid, labels, where))
        return await asyncio.shield(self._verdicts[study_uid])

    async def _decide(self, study_uid: str, labels: tuple[str, ...], where: Where) -> Verdict:
        verdict = await authorise(self._b, self._token, STORE_ACTION, "study", study_uid, labels, where)
        if not verdict.allow:
            await record(
                self._b,
                Action.AUDIT_ACTION_INSTANCE_REJECTED,
                Outcome.AUDIT_OUTCOME_DENIED,
                verdict.subject,
                verdict=verdict,
                study_uid=study_uid,
                reason=verdict.reason_code or "denied",
                details={"route": "stow-rs", "request_id": self._request_id},
            )
            if verdict.reason_code == "unauthenticated" and not self._stored:
                # A bad token fails the whole request while nothing has been stored yet.
                raise refusal(verdict)
        return verdict

    def _fail(self, sop_class: str, sop_uid: str, reason: int) -> None:
        item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [reason]}}
        if sop_class:
            item["00081150"] = {"vr": "UI", "Value": [sop_class]}
        if sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [sop_uid]}
        self._failed.append(item)
