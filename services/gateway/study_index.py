"""The QIDO-RS index in MongoDB: studies, series and instances, kept in sync from `dicom.stored`
(and `dicom.erased`: a crypto-shredded patient's entries are deleted).

Three collections so paging works per level without scanning instances. Upserts are keyed by
UID, so indexing the same instance twice (redelivery, or STOW plus the stored event) changes
nothing. Related counts are counted when a page is answered, never stored: concurrent writers
cannot leave a stale count behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo import ASCENDING, AsyncMongoClient, UpdateOne
from pymongo.errors import PyMongoError
from pymongo.write_concern import WriteConcern

from services.gateway.index_entry import IndexEntry
from services.gateway.instance_layout import InstanceLayout

log = logging.getLogger("dicomsafe.gateway.index")

Level = str  # "study" | "series" | "instance"

# A study's read time (``accessed_at``, for the tiering policy's "not read for N days") is
# written at most once per this many seconds per study and gateway process: exact enough for a
# rule counted in days, and a busy study costs no write per read.
ACCESS_RESOLUTION_S = 3600.0
# Studies whose last write is remembered; beyond that the oldest are forgotten (and written again
# on their next read).
ACCESS_MEMORY = 100_000

# Attribute → VR family, for the PS3.18 8.3.4 matching rules.
PERSON_NAMES = frozenset({"PatientName", "ReferringPhysicianName"})
DATES = frozenset({"StudyDate", "PatientBirthDate"})
TIMES = frozenset({"StudyTime"})
UIDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})
MATCHABLE: Mapping[Level, frozenset[str]] = {
    "study": frozenset(
        {
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "ReferringPhysicianName",
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyInstanceUID",
            "StudyID",
            "StudyDescription",
            "ModalitiesInStudy",
        }
    ),
    "series": frozenset({"Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription"}),
    "instance": frozenset({"SOPClassUID", "SOPInstanceUID", "InstanceNumber"}),
}


class Pseudonymiser(Protocol):
    """The keyed UID mapping of de-identified releases (deidentify.Deidentifier)."""

    @property
    def key_id(self) -> str: ...

    def pseudonymous_uid(self, uid: str) -> str: ...


# Each entry also keeps its pseudonymous UID (and which key made it): the keyed hash cannot be
# inverted, and a researcher addresses studies, series and instances by the UIDs they were given.
PSEUDO_UID, PSEUDO_KEY = "pseudo_uid", "pseudo_key"


class QueryError(ValueError):
    """A query parameter that cannot be matched; the message names the attribute, not the value."""


@dataclass(frozen=True)
class Found:
    """One QIDO hit: its DICOM JSON attributes and what authorising it needs."""

    attrs: dict[str, Any]
    study_uid: str
    labels: tuple[str, ...]
    department: str
    site: str
    patient_ref: str


@dataclass(frozen=True)
class Located:
    """Where one instance is stored, and what authorising access to it needs."""

    object_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax_uid: str
    size: int
    layout: InstanceLayout
    labels: tuple[str, ...]
    department: str
    site: str
    patient_ref: str
    sop_class_uid: str = ""


def matching_filter(level: Level, params: Mapping[str, str], fuzzy: bool = False) -> dict[str, Any]:
    """Mongo filter for QIDO matching keys of one level (single value, wildcard, range, UID list).

    ``fuzzy`` (QIDO ``fuzzymatching=true``, PS3.18 8.3.4.6): a person name matches when any of
    its name components starts with the value, case-insensitively ("doe" finds "DOE^JANE" and
    "SMITH^JOHN DOE"); wildcards keep their exact meaning.
    """
    query: dict[str, Any] = {}
    for keyword, raw in params.items():
        if keyword not in MATCHABLE[level]:
            raise QueryError(f"{keyword} is not a supported matching key at {level} level")
        value = raw.strip()
        if not value:
            continue  # universal matching: the attribute is returned, nothing is filtered
        field = "modalities" if keyword == "ModalitiesInStudy" else f"match.{keyword}"
        if keyword in UIDS:
            uids = [u.strip() for u in value.replace("\\", ",").split(",") if u.strip()]
            query[field] = {"$in": uids}
        elif keyword in DATES or keyword in TIMES:
            query[field] = _range(keyword, value)
        elif "*" in value or "?" in value:
            pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
            flags = "i" if keyword in PERSON_NAMES else ""
            query[field] = {"$regex": f"^{pattern}$", "$options": flags} if flags else {"$regex": f"^{pattern}$"}
        elif keyword in PERSON_NAMES and fuzzy:
            query[field] = {"$regex": f"(^|[\\^ =]){re.escape(value)}", "$options": "i"}
        elif keyword in PERSON_NAMES:
            query[field] = {"$regex": f"^{re.escape(value)}$", "$options": "i"}
        else:
            query[field] = value
    return query


def _range(keyword: str, value: str) -> Any:
    digits = re.compile(r"^\d*$")
    low, sep, high = value.partition("-")
    if not sep:
        if not digits.match(value) or not value:
            raise QueryError(f"{keyword} must be digits or a range a-b")
        return {"$regex": f"^{value}"} if keyword in TIMES else value
    if not digits.match(low) or not digits.match(high):
        raise QueryError(f"{keyword} range must be digits-digits")
    bounds: dict[str, str] = {}
    if low:
        bounds["$gte"] = low
    if high:
        # "20200131" as an upper bound includes that whole day; times compare as prefixes too.
        bounds["$lte"] = high + "\uffff"
    return bounds


class StudyIndex:
    def __init__(
        self, client: AsyncMongoClient[dict[str, Any]], database: str, pseudonyms: Pseudonymiser | None = None
    ) -> None:
        self._pseudonyms = pseudonyms
        db = client[database]
        durable = WriteConcern(w="majority", j=True)
        self._studies = db.get_collection("studies", write_concern=durable)
        self._series = db.get_collection("series", write_concern=durable)
        self._instances = db.get_collection("instances", write_concern=durable)
        # Pseudonyms of crypto-shredded patients (no PHI): closes the race in which an entry
        # described just before the key was destroyed is written just after its erasure ran.
        self._erased = db.get_collection("erased_patients", write_concern=durable)
        # Study UID -> monotonic time its accessed_at was last written by this process.
        self._access_written: dict[str, float] = {}
        self._access_writes: set[asyncio.Task[None]] = set()

    async def ensure_indexes(self) -> None:
        # Counts per page are count_documents on these.
        await self._series.create_index([("study_uid", ASCENDING)], name="study")
        await self._instances.create_index([("study_uid", ASCENDING)], name="study")
        await self._instances.create_index([("series_uid", ASCENDING)], name="series")
        await self._studies.create_index([("match.PatientID", ASCENDING)], name="patient_id")
        await self._studies.create_index([("match.StudyDate", ASCENDING)], name="study_date")
        for collection in (self._studies, self._series, self._instances):
            await collection.create_index([(PSEUDO_UID, ASCENDING)], name=PSEUDO_UID)
            # Erasure finds a patient's entries by their pseudonym.
            await collection.create_index([("patient_ref", ASCENDING)], name="patient_ref")

    def _pseudo(self, uid: str) -> dict[str, str]:
        if self._pseudonyms is None:
            return {}
        return {PSEUDO_UID: self._pseudonyms.pseudonymous_uid(uid), PSEUDO_KEY: self._pseudonyms.key_id}

    async def backfill_pseudonyms(self, batch: int = 1000) -> int:
        """Give entries indexed before pseudonyms were kept, or under another key, the current ones."""
        if self._pseudonyms is None:
            return 0
        done = 0
        for collection in (self._studies, self._series, self._instances):
            stale = {PSEUDO_KEY: {"$ne": self._pseudonyms.key_id}}
            while ids := [str(d["_id"]) async for d in collection.find(stale, {"_id": 1}).limit(batch)]:
                await collection.bulk_write([UpdateOne({"_id": uid}, {"$set": self._pseudo(uid)}) for uid in ids])
                done += len(ids)
        return done

    async def real_uids(self, level: Level, pseudonymous: Sequence[str]) -> list[str]:
        """The indexed UIDs behind pseudonymous ones of one level (unknown ones are left out)."""
        collection = {"study": self._studies, "series": self._series, "instance": self._instances}[level]
        wanted = sorted(set(pseudonymous))
        return [str(d["_id"]) async for d in collection.find({PSEUDO_UID: {"$in": wanted}}, {"_id": 1})]

    async def locate_pseudonymous(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> list[Located]:
        """locate() addressed by the pseudonymous UIDs of a de-identified release."""
        real: list[str] = []
        for level, uid in (("study", study_uid), ("series", series_uid), ("instance", sop_uid)):
            if not uid:
                real.append("")
                continue
            found = await self.real_uids(level, [uid])
            if not found:
                return []
            real.append(found[0])
        return await self.locate(*real)

    async def add(self, entry: IndexEntry) -> None:
        """Index one instance (idempotent)."""
        await self.add_many([entry])

    async def add_many(self, entries: Sequence[IndexEntry]) -> None:
        """Index instances with one bulk write per level and one erasure check: what add() of
        each in turn would leave, at a fraction of the operations (a STOW-RS request's instances
        share their series and study)."""
        if not entries:
            return
        now = dt.datetime.now(dt.UTC)
        # Keyed by UID, later entries replacing earlier ones as sequential upserts would.
        instances: dict[str, IndexEntry] = {}
        series: dict[str, IndexEntry] = {}
        studies: dict[str, IndexEntry] = {}
        labels: dict[str, set[str]] = {}
        modalities: dict[str, set[str]] = {}
        # The earliest stored_at per patient: if an erasure covers any entry, it covers that one.
        earliest: dict[str, dt.datetime] = {}
        for entry in entries:
            instances[entry.sop_uid] = series[entry.series_uid] = studies[entry.study_uid] = entry
            labels.setdefault(entry.study_uid, set()).update(entry.labels)
            if modality := str(entry.series["match"].get("Modality", "")):
                modalities.setdefault(entry.study_uid, set()).add(modality)
            if entry.patient_ref:
                stored_at = _utc(entry.stored_at or now)
                earliest[entry.patient_ref] = min(stored_at, earliest.get(entry.patient_ref, stored_at))
        await self._instances.bulk_write(
            [self._instance_upsert(uid, entry, now) for uid, entry in instances.items()], ordered=False
        )
        await self._series.bulk_write([self._series_upsert(uid, entry) for uid, entry in series.items()], ordered=False)
        await self._studies.bulk_write(
            [
                self._study_upsert(uid, entry, labels[uid], modalities.get(uid, set()), now)
                for uid, entry in studies.items()
            ],
            ordered=False,
        )
        # Written first, checked after: an erasure whose marker we do not see yet deletes after
        # our writes; one whose marker we see ran before them, so we undo what it covers.
        if earliest:
            async for marker in self._erased.find({"_id": {"$in": sorted(earliest)}}):
                erased_at = _utc(marker["erased_at"])
                if earliest[str(marker["_id"])] <= erased_at:
                    await self.remove_patient(str(marker["_id"]), erased_at)

    def _instance_upsert(self, sop_uid: str, entry: IndexEntry, now: dt.datetime) -> UpdateOne:
        return UpdateOne(
            {"_id": sop_uid},
            {
                "$set": {
                    "study_uid": entry.study_uid,
                    "series_uid": entry.series_uid,
                    "object_id": entry.object_id,
                    "attrs": entry.instance["json"],
                    "match": entry.instance["match"],
                    "transfer_syntax_uid": entry.transfer_syntax_uid,
                    "size": entry.size,
                    "layout": entry.layout.as_document(),
                    "patient_ref": entry.patient_ref,
                    "indexed_at": now,
                    "stored_at": entry.stored_at or now,
                    **self._pseudo(sop_uid),
                }
            },
            upsert=True,
        )

    def _series_upsert(self, series_uid: str, entry: IndexEntry) -> UpdateOne:
        return UpdateOne(
            {"_id": series_uid},
            {
                "$set": {
                    "study_uid": entry.study_uid,
                    "attrs": entry.series["json"],
                    "match": entry.series["match"],
                    "patient_ref": entry.patient_ref,
                    **self._pseudo(series_uid),
                }
            },
            upsert=True,
        )

    def _study_upsert(
        self, study_uid: str, entry: IndexEntry, labels: set[str], modalities: set[str], now: dt.datetime
    ) -> UpdateOne:
        # $addToSet, not read-modify-write: other STOW requests and the indexer may add to one
        # study at once. Labels are a union: one sensitive instance makes the study sensitive.
        grow: dict[str, Any] = {"labels": {"$each": sorted(labels)}}
        if modalities:
            grow["modalities"] = {"$each": sorted(modalities)}
        return UpdateOne(
            {"_id": study_uid},
            {
                "$set": {
                    "attrs": entry.study["json"],
                    "match": entry.study["match"],
                    "department": entry.department,
                    "site": entry.site,
                    "patient_ref": entry.patient_ref,
                    "updated_at": now,
                    **self._pseudo(study_uid),
                },
                "$addToSet": grow,
            },
            upsert=True,
        )

    async def remove_patient(self, patient_ref: str, erased_at: dt.datetime) -> int:
        """Delete the entries of one patient's objects stored up to ``erased_at`` (their erasure
        key is destroyed: the objects no longer open, and the index must not keep their names
        and IDs). Returns how many entries went; idempotent, and a replayed old erasure leaves a
        returning patient's later studies (sealed under a fresh key) alone.

        The erasure is remembered (latest time per pseudonym) before anything is deleted, so an
        entry written concurrently (``add_many``) removes itself. Instances go first, then series and
        studies with no instance left: a crash in between is redone on redelivery.
        """
        if not patient_ref:
            # An empty reference would match every entry indexed without a patient.
            raise ValueError("an erasure needs a patient reference")
        erased_at = _utc(erased_at)
        await self._erased.update_one({"_id": patient_ref}, {"$max": {"erased_at": erased_at}}, upsert=True)
        covered = {"$or": [{"stored_at": {"$lte": erased_at}}, {"stored_at": {"$exists": False}}]}
        removed = (await self._instances.delete_many({"patient_ref": patient_ref, **covered})).deleted_count
        for collection, child_key in ((self._series, "series_uid"), (self._studies, "study_uid")):
            async for doc in collection.find({"patient_ref": patient_ref}, {"_id": 1}):
                if not await self._instances.count_documents({child_key: doc["_id"]}, limit=1):
                    removed += (await collection.delete_one({"_id": doc["_id"]})).deleted_count
        return removed

    async def study_context(self, study_uid: str) -> tuple[tuple[str, ...], str, str, str] | None:
        """(labels, site, department, patient_ref) of an indexed study; None while it is not indexed."""
        doc = await self._studies.find_one({"_id": study_uid})
        if doc is None:
            return None
        return (
            tuple(doc.get("labels", [])),
            str(doc.get("site", "")),
            str(doc.get("department", "")),
            str(doc.get("patient_ref", "")),
        )

    def note_access(self, study_uid: str) -> None:
        """Records that a study was read, in the background: a retrieval never waits on it (nor
        fails with it: the audit trail, not this, is the record of who read what)."""
        now = time.monotonic()
        last = self._access_written.get(study_uid)
        if last is not None and now - last < ACCESS_RESOLUTION_S:
            return
        if len(self._access_written) >= ACCESS_MEMORY:
            for uid in list(self._access_written)[: ACCESS_MEMORY // 10]:  # insertion order: oldest first
                del self._access_written[uid]
        self._access_written.pop(study_uid, None)
        self._access_written[study_uid] = now
        task = asyncio.get_running_loop().create_task(self._write_access(study_uid))
        self._access_writes.add(task)
        task.add_done_callback(self._access_writes.discard)

    async def _write_access(self, study_uid: str) -> None:
        try:
            # $max: a slower replica's older time never replaces a newer one.
            await self._studies.update_one({"_id": study_uid}, {"$max": {"accessed_at": dt.datetime.now(dt.UTC)}})
        except PyMongoError as exc:
            self._access_written.pop(study_uid, None)  # written on the next read instead
            log.warning("study access time not recorded", extra={"error": type(exc).__name__})

    async def drain_access_writes(self) -> None:
        """Waits for the access times being written (before the client closes, at shutdown)."""
        if self._access_writes:
            await asyncio.gather(*self._access_writes, return_exceptions=True)

    async def has(self, sop_uid: str, object_id: str) -> bool:
        """Whether exactly this stored object is indexed already (e.g. by the STOW-RS request)."""
        return (sop_uid, object_id) in await self.indexed([(sop_uid, object_id)])

    async def indexed(self, objects: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (SOP Instance UID, object id) pairs are indexed already, in one read."""
        if not objects:
            return set()
        wanted = set(objects)
        found = self._instances.find({"_id": {"$in": sorted({uid for uid, _ in wanted})}}, {"object_id": 1})
        return {pair async for doc in found if (pair := (str(doc["_id"]), str(doc.get("object_id", "")))) in wanted}

    async def stored_classes(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """SOP Class UID of each of these instances that is indexed, i.e. sealed, stored and
        announced (the indexer only sees instances after their `dicom.stored` event)."""
        if not sop_uids:
            return {}
        found = self._instances.find({"_id": {"$in": sorted(set(sop_uids))}}, {"match.SOPClassUID": 1})
        return {str(doc["_id"]): str(doc.get("match", {}).get("SOPClassUID", "")) async for doc in found}

    async def search(
        self,
        level: Level,
        params: Mapping[str, str],
        *,
        study_uid: str = "",
        series_uid: str = "",
        offset: int = 0,
        limit: int = 100,
        fuzzy: bool = False,
    ) -> list[Found]:
        """Hits of one level, study-level keys applying to the parents of series and instances."""
        own = {k: v for k, v in params.items() if k in MATCHABLE[level]}
        parent_keys = {k: v for k, v in params.items() if k not in MATCHABLE[level]}
        for keyword in parent_keys:
            if not any(keyword in MATCHABLE[lv] for lv in _parents(level)):
                raise QueryError(f"{keyword} is not a supported matching key at {level} level")
        query = matching_filter(level, own, fuzzy)
        if level != "study":
            studies = await self._matching_parents(
                "study", {k: v for k, v in parent_keys.items() if k in MATCHABLE["study"]}, study_uid, fuzzy=fuzzy
            )
            query["study_uid"] = {"$in": studies}
        if level == "instance":
            series = await self._matching_parents(
                "series",
                {k: v for k, v in parent_keys.items() if k in MATCHABLE["series"]},
                series_uid,
                study_uid=study_uid,
                fuzzy=fuzzy,
            )
            query["series_uid"] = {"$in": series}
        elif series_uid:
            raise QueryError("a series UID in the path needs instance level")
        if level == "study" and study_uid:
            query["_id"] = study_uid
        collection = {"study": self._studies, "series": self._series, "instance": self._instances}[level]
        docs = [doc async for doc in collection.find(query).sort("_id", ASCENDING).skip(offset).limit(limit)]
        # Independent reads of the page's context: concurrent, not one round trip after another.
        context, series_attrs, counts = await asyncio.gather(
            self._study_context({str(d.get("study_uid", d["_id"])) for d in docs}),
            self._series_attrs(docs) if level == "instance" else _nothing(),
            self._counts(level, docs),
        )
        hits: list[Found] = []
        for doc in docs:
            owner = str(doc["_id"]) if level == "study" else str(doc["study_uid"])
            study = context.get(owner, {})
            hits.append(
                Found(
                    attrs=_result_attrs(
                        level, doc, study, series_attrs.get(str(doc.get("series_uid")), {}), counts.get(str(doc["_id"]))
                    ),
                    study_uid=owner,
                    labels=tuple(study.get("labels", [])),
                    department=str(study.get("department", "")),
                    site=str(study.get("site", "")),
                    patient_ref=str(study.get("patient_ref", "")),
                )
            )
        return hits

    async def locate(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> list[Located]:
        """Stored instances under a study (optionally one series / one instance), in UID order."""
        query: dict[str, Any] = {"study_uid": study_uid}
        if series_uid:
            query["series_uid"] = series_uid
        if sop_uid:
            query["_id"] = sop_uid
        study = await self._studies.find_one({"_id": study_uid}) or {}
        return [
            Located(
                object_id=str(doc["object_id"]),
                study_uid=study_uid,
                series_uid=str(doc["series_uid"]),
                sop_uid=str(doc["_id"]),
                transfer_syntax_uid=str(doc.get("transfer_syntax_uid", "")),
                size=int(doc.get("size", 0)),
                layout=InstanceLayout.from_document(doc["layout"]),
                labels=tuple(study.get("labels", [])),
                department=str(study.get("department", "")),
                site=str(study.get("site", "")),
                patient_ref=str(study.get("patient_ref", "")),
                sop_class_uid=str(doc.get("match", {}).get("SOPClassUID", "")),
            )
            async for doc in self._instances.find(query).sort("_id", ASCENDING)
        ]

    async def _matching_parents(
        self, level: Level, params: Mapping[str, str], uid: str, study_uid: str = "", fuzzy: bool = False
    ) -> list[str]:
        query = matching_filter(level, params, fuzzy)
        if uid:
            query["_id"] = uid
        if study_uid and level == "series":
            query["study_uid"] = study_uid
        collection = self._studies if level == "study" else self._series
        return [str(doc["_id"]) async for doc in collection.find(query, {"_id": 1})]

    async def _counts(self, level: Level, docs: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
        """(series, instances) per study, or (0, instances) per series, for one page: one grouped
        count per collection, whatever the page size (a worklist page of 100 studies made 200
        sequential counts)."""
        uids = [str(doc["_id"]) for doc in docs]
        if level not in ("study", "series") or not uids:
            return {}
        key = "study_uid" if level == "study" else "series_uid"
        instances = self._grouped_count(self._instances, key, uids)
        if level == "series":
            per_series = await instances
            return {uid: (0, per_series.get(uid, 0)) for uid in uids}
        series, per_study = await asyncio.gather(self._grouped_count(self._series, key, uids), instances)
        return {uid: (series.get(uid, 0), per_study.get(uid, 0)) for uid in uids}

    @staticmethod
    async def _grouped_count(collection: Any, key: str, uids: list[str]) -> dict[str, int]:
        pipeline = [{"$match": {key: {"$in": uids}}}, {"$group": {"_id": f"${key}", "n": {"$sum": 1}}}]
        return {str(d["_id"]): int(d["n"]) async for d in await collection.aggregate(pipeline)}

    async def _series_attrs(self, docs: list[dict[str, Any]]) -> dict[str, Any]:
        wanted = sorted({str(d["series_uid"]) for d in docs})
        return {str(s["_id"]): s.get("attrs", {}) async for s in self._series.find({"_id": {"$in": wanted}})}

    async def _study_context(self, study_uids: set[str]) -> dict[str, dict[str, Any]]:
        if not study_uids:
            return {}
        return {str(d["_id"]): d async for d in self._studies.find({"_id": {"$in": sorted(study_uids)}})}


async def _nothing() -> dict[str, Any]:
    return {}


def _parents(level: Level) -> Sequence[Level]:
    return {"study": (), "series": ("study",), "instance": ("study", "series")}[level]


def _result_attrs(
    level: Level,
    doc: Mapping[str, Any],
    study: Mapping[str, Any],
    series: Mapping[str, Any],
    counts: tuple[int, int] | None,
) -> dict[str, Any]:
    attrs: dict[str, Any] = dict(study.get("attrs", {}))
    attrs.update(series)
    series_count, instance_count = counts or (0, 0)
    if level == "study":
        modalities = sorted(doc.get("modalities", []))
        attrs["00080061"] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
        attrs["00201206"] = {"vr": "IS", "Value": [series_count]}
        attrs["00201208"] = {"vr": "IS", "Value": [instance_count]}
    else:
        attrs.update(doc.get("attrs", {}))
        if level == "series":
            attrs["00201209"] = {"vr": "IS", "Value": [instance_count]}
    return attrs


def _utc(when: dt.datetime) -> dt.datetime:
    """MongoDB hands datetimes back naive (UTC); compare like with like."""
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
