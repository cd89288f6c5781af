"""The audit store: append-only, hash-chained records in their own MongoDB database.

The code only ever inserts and finds (the database user is meant to have nothing else), so
a record, once written, changes only by tampering — which verification detects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import bson
from bson.datetime_ms import DatetimeMS
from bson.errors import InvalidDocument
from bson.raw_bson import RawBSONDocument
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import ParseDict
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from dicomsafe.common.kafka import PermanentError, TransientError
from dicomsafe.v1 import audit_pb2
from services.audit.bson_fields import documents
from services.audit.chain import (
    CHECKPOINT_MALFORMED,
    CHECKPOINT_SIGNATURE_INVALID,
    GENESIS,
    RECORD_VERSION,
    Break,
    ChainReport,
    ChainVerifier,
    IntactRange,
    event_document,
    hashed_elements,
    link_hash_v2,
)
from services.audit.checkpoints import Checkpoint, signature_valid
from services.audit.paging import (
    MAX_LIMIT,
    MAX_PAGE_SIZE,
    ORDER,
    ORDERED_INDEXES,
    Filters,
    Position,
    encode_token,
    position_of,
)

log = logging.getLogger("dicomsafe.audit.store")

COLLECTION = "events"
CHECKPOINTS = "checkpoints"
# Markers of raised security alerts (services/audit/alerts.py): insert-only, like the rest.
ALERTS = "alerts"
# Positions up to which each chain went to the external audit repository (syslog_forward.py).
FORWARDED = "forwarded"
# Records per raw batch when verifying (~3.5 MB), and chains checked side by side.
VERIFY_BATCH = 5000
VERIFY_PARALLEL_CHAINS = 4
# Duplicate key (11000; 11001 and 12582 from older servers).
_DUPLICATE_KEY = frozenset({11000, 11001, 12582})
# Per-document write errors that a retry can clear (write conflict, time limit, failover).
_TRANSIENT_WRITE_CODES = frozenset({50, 91, 112, 189, 262, 10107, 11600, 11602, 13435, 13436})
_ORDER = [(key, ASCENDING) for key, _ in ORDER]
_LEGACY_INDEXES = frozenset({"study", "actor", "object", "patient", "recorded_at"})


@dataclass
class Head:
    seq: int
    hash: str


@dataclass(frozen=True)
class Verdict:
    chains: int
    records: int
    # Every break, chain by chain in seq order.
    breaks: list[Break]
    checkpoints: int = 0
    # The ranges that verify, chain by chain in seq order.
    intact: list[IntactRange] = dataclasses.field(default_factory=list)
    # Beyond the per-chain listing limit (chain.MAX_LISTED): counted only.
    unlisted_breaks: int = 0
    unlisted_ranges: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.unlisted_breaks

    def first_breaks(self) -> list[Break]:
        """The first break of each broken chain (what verification reported before it went on)."""
        first: dict[str, Break] = {}
        for b in self.breaks:
            first.setdefault(b.chain, b)
        return list(first.values())


def chained_records(chain: str, head: Head, events: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Records (version 2) continuing a chain from its head: (event id, event BSON) each."""
    records, prev, seq = [], head.hash, head.seq
    # BSON dates hold milliseconds: the hash covers exactly what is stored.
    recorded_at = DatetimeMS(time.time_ns() // 1_000_000)
    for event_id, event_bson in events:
        seq += 1
        # The writer's layout (chain.py): hash last, over everything before it.
        record: dict[str, Any] = {
            "chain": chain,
            "seq": seq,
            "v": RECORD_VERSION,
            "prev_hash": prev,
            "event_id": event_id,
            "event": RawBSONDocument(event_bson),
            "recorded_at": recorded_at,
        }
        digest = link_hash_v2(prev, hashed_elements(record))
        record["hash"] = digest
        records.append(record)
        prev = digest
    return records


class AuditStore:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        # Majority + journal: an acknowledged insert survives a crash, so the offset may be committed.
        self._events = client[database].get_collection(COLLECTION, write_concern=WriteConcern(w="majority", j=True))
        self._heads: dict[str, Head] = {}
        self._checkpoints = client[database].get_collection(
            CHECKPOINTS, write_concern=WriteConcern(w="majority", j=True)
        )
        self._alerts = client[database].get_collection(ALERTS, write_concern=WriteConcern(w="majority", j=True))
        self._forwarded = client[database].get_collection(FORWARDED, write_concern=WriteConcern(w="majority", j=True))

    async def ensure_indexes(self) -> None:
        await self._events.create_index([("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="chain_seq")
        await self._events.create_index("event_id", unique=True, name="event_id")
        # One index per identifier filter and one for time, each ending in the query order, so
        # any of them walks its records already sorted and a page resumes by a seek, not a sort.
        # Action and outcome get none: ~20 and 3 values select too little to pay an index on
        # every append; they filter the walk one of these chooses.
        existing = {ix["name"] async for ix in await self._events.list_indexes()}
        for name, field in ORDERED_INDEXES.items():
            keys = ([(field, ASCENDING)] if field else []) + _ORDER
            await self._events.create_index(keys, name=name)
        for legacy in _LEGACY_INDEXES & existing:  # single-field forms, superseded by the above
            await self._events.drop_index(legacy)
        await self._checkpoints.create_index([("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="chain_seq")
        # Also creates the collection, which the insert/find-only writer may not do itself everywhere.
        await self._alerts.create_index([("rule", ASCENDING), ("actor", ASCENDING)], name="rule_actor")
        await self._forwarded.create_index([("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="chain_seq")

    async def check_indexes(self) -> None:
        """The service's own user may not create indexes: refuse to run without them, since
        the unique ones are what keep chains from forking and events from doubling, and queries
        name the ordered ones (a hint to a missing index fails every query)."""
        names = {ix["name"] async for ix in await self._events.list_indexes()}
        missing = {"chain_seq", "event_id", *ORDERED_INDEXES} - names
        if missing:
            raise RuntimeError(
                f"audit indexes missing ({', '.join(sorted(missing))}): run `python -m services.audit provision`"
            )

    async def _load_head(self, chain: str) -> Head:
        last = await self._events.find_one({"chain": chain}, sort=[("seq", -1)], projection={"seq": 1, "hash": 1})
        head = Head(int(last["seq"]), str(last["hash"])) if last else Head(0, GENESIS)
        self._heads[chain] = head
        return head

    async def append(self, chain: str, event: audit_pb2.AuditEvent) -> int | None:
        """Append one event; return its seq, or None if this event id is already recorded."""
        seqs = await self.append_many(chain, [event])
        return seqs[0]

    async def append_many(self, chain: str, events: Sequence[audit_pb2.AuditEvent]) -> list[int | None]:
        """Append events in order with one ordered insert_many; idempotent per event id.

        Returns each event's seq, or None for an event already recorded (a redelivery). On a
        duplicate event id the insert stops there: that event is skipped and the rest are
        chained again from the new head. On a taken seq (another writer, e.g. a consumer about
        to lose its partition) the head is reloaded and the rest retried.
        """
        try:
            # The event's BSON bytes are hashed as they will be stored (chain.py, version 2).
            docs_events = [(event.event_id, bson.encode(event_document(event))) for event in events]
        except InvalidDocument:
            # E.g. a NUL byte in a details key. The message may quote content: only its type.
            raise PermanentError("bad_event", "audit event cannot be stored as a document (InvalidDocument)") from None
        results: list[int | None] = [None] * len(events)
        pending = list(range(len(events)))
        seen: set[str] = set()
        try:
            for _ in range(len(events) + 20):
                # An event met again (twice in one batch, or just found recorded) is skipped.
                pending = [i for i in pending if docs_events[i][0] not in seen]
                if not pending:
                    return results
                head = self._heads.get(chain) or await self._load_head(chain)
                records = chained_records(chain, head, [docs_events[i] for i in pending])
                try:
                    await self._events.insert_many(records, ordered=True)
                except BulkWriteError as exc:
                    errors = exc.details.get("writeErrors", [])
                    failed_at = int(errors[0]["index"]) if errors else 0
                    self._mark_inserted(chain, records[:failed_at], pending, results, seen)
                    pending = pending[failed_at:]
                    if not errors:  # e.g. a write concern error: what was written is unknown
                        await self._load_head(chain)
                    elif errors[0].get("code") not in _DUPLICATE_KEY:
                        # Neither a redelivery nor a lost race: retrying the same document would
                        # block the partition forever, so it goes to the dead-letter topic.
                        self._heads.pop(chain, None)
                        code = errors[0].get("code")
                        if code in _TRANSIENT_WRITE_CODES:
                            raise TransientError(f"MongoDB write error {code}") from None
                        raise PermanentError("store_rejected", f"MongoDB refused the record (code {code})") from None
                    elif await self._event_recorded(errors[0], docs_events[pending[0]][0]):
                        seen.add(docs_events[pending[0]][0])  # recorded by an earlier delivery
                        pending = pending[1:]
                    else:
                        await self._load_head(chain)  # another writer took the seq
                    continue
                except InvalidDocument as exc:
                    # Refused by the driver before it reached the server (e.g. a NUL byte in a
                    # details key, or too large). The message may quote content: only its type.
                    self._heads.pop(chain, None)
                    raise PermanentError(
                        "bad_event", f"audit event cannot be stored as a document ({type(exc).__name__})"
                    ) from None
                self._mark_inserted(chain, records, pending, results, seen)
                return results
        except PyMongoError as exc:
            self._heads.pop(chain, None)  # the head is unknown after a failed write
            raise TransientError(f"MongoDB unavailable ({type(exc).__name__})") from None
        raise TransientError("could not claim sequence numbers")

    async def _event_recorded(self, error: Mapping[str, Any], event_id: str) -> bool:
        """Was this duplicate key the event id (a redelivery) rather than (chain, seq)?
        Servers that do not say which index (no keyPattern) are asked directly."""
        key_pattern = error.get("keyPattern")
        if isinstance(key_pattern, Mapping):
            return "event_id" in key_pattern
        return await self._events.find_one({"event_id": event_id}, projection={"_id": 1}) is not None

    def _mark_inserted(
        self,
        chain: str,
        inserted: list[dict[str, Any]],
        pending: list[int],
        results: list[int | None],
        seen: set[str],
    ) -> None:
        for record, i in zip(inserted, pending, strict=False):
            results[i] = int(record["seq"])
            seen.add(str(record["event_id"]))
        if inserted:
            self._heads[chain] = Head(int(inserted[-1]["seq"]), str(inserted[-1]["hash"]))

    def heads(self) -> dict[str, Head]:
        """Heads of the chains this instance has written (for checkpointing)."""
        return dict(self._heads)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with contextlib.suppress(DuplicateKeyError):  # this head is already checkpointed
            await self._checkpoints.insert_one({**asdict(checkpoint), "signed_at": dt.datetime.now(dt.UTC)})

    async def alerted_evidence(self, rule: str, actor: str) -> set[str]:
        """Evidence event ids already carried by alerts of this rule about this subject."""
        seen: set[str] = set()
        async for doc in self._alerts.find({"rule": rule, "actor": actor}, projection={"evidence": 1}):
            seen.update(str(e) for e in doc.get("evidence", []))
        return seen

    async def mark_alerted(
        self, alert_id: str, rule: str, actor: str, evidence: Sequence[str], raised_at: dt.datetime
    ) -> None:
        doc = {"_id": alert_id, "rule": rule, "actor": actor, "evidence": list(evidence), "raised_at": raised_at}
        with contextlib.suppress(DuplicateKeyError):  # raised by another replica or an earlier run
            await self._alerts.insert_one(doc)

    async def chains(self) -> list[str]:
        return sorted(await self._events.distinct("chain"))

    async def forwarded_up_to(self, chain: str) -> int:
        last = await self._forwarded.find_one({"chain": chain}, sort=[("seq", -1)], projection={"seq": 1})
        return int(last["seq"]) if last else 0

    async def mark_forwarded(self, chain: str, seq: int) -> None:
        with contextlib.suppress(DuplicateKeyError):  # another replica marked the same position
            await self._forwarded.insert_one({"chain": chain, "seq": seq, "at": dt.datetime.now(dt.UTC)})

    async def records_after(self, chain: str, seq: int, limit: int) -> list[audit_pb2.AuditRecord]:
        cursor = self._events.find({"chain": chain, "seq": {"$gt": seq}}, sort=[("seq", ASCENDING)], limit=limit)
        return [to_record(doc) async for doc in cursor]

    async def estimated_records(self) -> int:
        """From collection metadata (no scan): enough for a progress bar."""
        return int(await self._events.estimated_document_count())

    async def verify(
        self,
        chain: str = "",
        public_keys: dict[int, Ed25519PublicKey] | None = None,
        progress: Callable[[int], None] | None = None,
        published: Mapping[str, Checkpoint] | None = None,
    ) -> Verdict:
        """Recompute every chain; with ``public_keys``, also check every signed checkpoint:
        its signature, that the record at its seq has its hash, and that the chain still
        reaches it (a shorter chain was truncated — even to nothing). Records and checkpoints
        are both streamed in seq order, so memory stays bounded whatever the length.
        ``progress`` is told how many records each step checked. ``published``: the newest
        signed checkpoint of each chain from outside the database (checkpoint_topic.py, its
        signature already checked), checked like the stored ones — so deleting the newest
        stored checkpoints with a chain's tail does not hide the truncation."""
        if chain:
            chains = [chain]
        else:
            names = set(await self._events.distinct("chain"))
            if public_keys is not None:  # a chain whose every record is gone still has checkpoints
                names |= set(await self._checkpoints.distinct("chain"))
            names |= set(published or ())
            chains = sorted(names)
        # A few chains at once: while one waits for the server's next batch, another is hashed.
        limit = asyncio.Semaphore(VERIFY_PARALLEL_CHAINS)

        async def one(name: str) -> tuple[ChainReport, int]:
            async with limit:
                return await self._verify_one(name, public_keys, progress, (published or {}).get(name))

        results = await asyncio.gather(*(one(name) for name in chains))
        reports = [report for report, _ in results]
        return Verdict(
            len(chains),
            sum(r.records for r in reports),
            [b for r in reports for b in r.breaks],
            sum(c for _, c in results),
            [i for r in reports for i in r.intact],
            sum(r.unlisted_breaks for r in reports),
            sum(r.unlisted_ranges for r in reports),
        )

    async def _records_in_order(self, name: str) -> AsyncGenerator[list[bytes], None]:
        """A chain's records in seq order, a batch at a time, undecoded: the next batch is
        asked for before this one is checked, so the server works while we hash."""
        cursor = self._events.find_raw_batches(
            {"chain": name}, projection={"_id": 0}, sort=[("seq", ASCENDING)], batch_size=VERIFY_BATCH
        )
        # A raw batch cursor yields each batch as BSON bytes (typed as documents by the driver).
        batches = cast(AsyncIterator[bytes], aiter(cursor))
        try:
            upcoming: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(batches, None))
            while (raw := await upcoming) is not None:
                upcoming = asyncio.ensure_future(anext(batches, None))
                await asyncio.sleep(0)  # let the request for the next batch go out
                yield list(documents(raw))
        finally:
            upcoming.cancel()
            await cursor.close()

    async def _verify_one(
        self,
        name: str,
        public_keys: dict[int, Ed25519PublicKey] | None,
        progress: Callable[[int], None] | None,
        published: Checkpoint | None = None,
    ) -> tuple[ChainReport, int]:
        verifier = ChainVerifier(name)
        checked_cps = 0

        async def signed_checkpoints() -> AsyncGenerator[Checkpoint, None]:
            """The stored checkpoints in seq order, the published one merged in at its place."""
            nonlocal checked_cps, published
            stored = stored_checkpoints()
            try:
                async for cp in stored:
                    if published is not None and published.seq <= cp.seq:
                        checked_cps += 1
                        yield published
                        published = None
                    yield cp
            finally:
                await stored.aclose()
            if published is not None:
                checked_cps += 1
                yield published

        async def stored_checkpoints() -> AsyncGenerator[Checkpoint, None]:
            nonlocal checked_cps
            if public_keys is None:
                return
            async for doc in self._checkpoints.find({"chain": name}, sort=[("seq", ASCENDING)], batch_size=1000):
                checked_cps += 1
                try:
                    cp = Checkpoint(str(doc["chain"]), int(doc["seq"]), str(doc["hash"]), str(doc["signature"]))
                except (KeyError, TypeError, ValueError):
                    verifier.bad_checkpoint(Break(name, 0, "checkpoint malformed", CHECKPOINT_MALFORMED))
                    continue
                if not signature_valid(public_keys, cp):
                    reason = "checkpoint signature invalid"
                    verifier.bad_checkpoint(Break(name, cp.seq, reason, CHECKPOINT_SIGNATURE_INVALID))
                    continue
                yield cp

        checkpoints = signed_checkpoints()
        records = self._records_in_order(name)
        try:
            # Each checkpoint goes in as soon as the walk reaches its seq: right after the
            # record there, or after the first record beyond a gap that swallowed it.
            pending = await anext(checkpoints, None)
            async for batch in records:
                for doc in batch:
                    verifier.feed_bson(doc)
                    while pending is not None and pending.seq <= verifier.last_seq:
                        verifier.checkpoint(pending)
                        pending = await anext(checkpoints, None)
                if progress:
                    progress(len(batch))
            reach = 0
            if pending is not None:  # beyond the last record: the tail was cut
                reach = pending.seq
                async for cp in checkpoints:
                    reach = max(reach, cp.seq)
        finally:
            await records.aclose()
            await checkpoints.aclose()
        return verifier.finish(reach), checked_cps

    async def exposure(self, actor: str, since: dt.datetime | None, until: dt.datetime | None) -> ExposureReport:
        return await self._disclosed(actor, {"event.actor": actor}, since, until)

    async def exposure_of_token(
        self, fingerprint: str, since: dt.datetime | None, until: dt.datetime | None
    ) -> ExposureReport:
        """What was released under one access token (a leaked credential): the decisions authz
        recorded for that token's fingerprint, then the releases made under those decisions —
        not everything its user received with other tokens."""
        flt: dict[str, Any] = {
            "event.action": audit_pb2.AuditAction.Name(audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION),
            "event.details.token_fingerprint": fingerprint,
        }
        if window := _window(since, until):
            flt["recorded_at"] = window
        decisions = {
            str(doc["event"]["details"]["decision_id"])
            async for doc in self._events.find(flt, projection={"event.details.decision_id": 1}, batch_size=1000)
            if doc["event"].get("details", {}).get("decision_id")
        }
        # The window bounds the decisions; a release follows its decision within seconds.
        return await self._disclosed(
            f"token {fingerprint}", {"event.details.decision_id": {"$in": sorted(decisions)}}, since, None
        )

    async def _disclosed(
        self, who: str, flt: dict[str, Any], since: dt.datetime | None, until: dt.datetime | None
    ) -> ExposureReport:
        flt = {
            **flt,
            "event.action": {"$in": [*_DISCLOSURES, _QUERIED]},
            "event.outcome": audit_pb2.AuditOutcome.Name(audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS),
        }
        if window := _window(since, until):
            flt["recorded_at"] = window
        patients: set[str] = set()
        studies: set[str] = set()
        objects: set[str] = set()
        queried: set[str] = set()
        events = 0
        async for doc in self._events.find(flt, projection={"event": 1}, batch_size=1000):
            event = doc["event"]
            events += 1
            if event.get("action") == _QUERIED:
                # The gateway lists the studies of each answer (their keys were shown).
                queried.update(s for s in str((event.get("details") or {}).get("studies", "")).split(",") if s)
                continue
            for target, field in ((patients, "patient_ref"), (studies, "study_instance_uid"), (objects, "object_id")):
                if event.get(field):
                    target.add(str(event[field]))
        return ExposureReport(
            who, events, frozenset(patients), frozenset(studies), frozenset(objects), frozenset(queried)
        )

    async def events_between(
        self, since: dt.datetime | None, until: dt.datetime | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Stored events (JSON form) recorded in the window, in recorded order."""
        flt: dict[str, Any] = {}
        if since or until:
            flt["recorded_at"] = {k: v for k, v in (("$gte", since), ("$lt", until)) if v}
        async for doc in self._events.find(
            flt, projection={"event": 1}, sort=[("recorded_at", ASCENDING)], batch_size=1000
        ):
            yield doc["event"]

    async def query(self, filters: Filters, limit: int = 100) -> AsyncIterator[audit_pb2.AuditRecord]:
        """Matching records in query order (recorded_at, chain, seq), at most ``limit``."""
        cursor = self._events.find(
            filters.mongo(), sort=_ORDER, limit=max(1, min(limit, MAX_LIMIT)), hint=filters.index()
        )
        async for doc in cursor:
            yield to_record(doc)

    async def query_page(
        self, filters: Filters, page_size: int, after: Position | None = None
    ) -> tuple[list[audit_pb2.AuditRecord], str]:
        """One page after ``after`` (None = from the start) and the token of the next page
        ("" when none). One record more than the page is read to know whether another follows."""
        size = max(1, min(page_size, MAX_PAGE_SIZE))
        flt = filters.mongo() if after is None else after.continue_after(filters.mongo())
        docs = [doc async for doc in self._events.find(flt, sort=_ORDER, limit=size + 1, hint=filters.index())]
        records = [to_record(doc) for doc in docs[:size]]
        if len(docs) <= size:
            return records, ""
        last = docs[size - 1]
        return records, encode_token(position_of(last["recorded_at"], str(last["chain"]), int(last["seq"])), filters)


@dataclass(frozen=True)
class ExposureReport:
    """What one subject actually received in a time window (GDPR art. 33/34 breach notices)."""

    actor: str
    events: int
    patient_refs: frozenset[str]
    studies: frozenset[str]
    objects: frozenset[str]
    # Studies whose query keys (names, IDs, dates) a QIDO-RS answer showed, images or not.
    queried_studies: frozenset[str] = frozenset()


def _window(since: dt.datetime | None, until: dt.datetime | None) -> dict[str, dt.datetime]:
    return {k: v for k, v in (("$gte", since), ("$lt", until)) if v}


# A query answer shows the matched studies' keys (patient names, IDs, dates) in clear.
_QUERIED = audit_pb2.AuditAction.Name(audit_pb2.AuditAction.AUDIT_ACTION_STUDY_QUERIED)
# Events that mean plaintext left the system for the actor.
_DISCLOSURES = [
    audit_pb2.AuditAction.Name(audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED),
    audit_pb2.AuditAction.Name(audit_pb2.AuditAction.AUDIT_ACTION_OBJECT_OPENED),
]


def to_record(doc: dict[str, Any]) -> audit_pb2.AuditRecord:
    record = audit_pb2.AuditRecord(chain=doc["chain"], seq=doc["seq"], prev_hash=doc["prev_hash"], hash=doc["hash"])
    ParseDict(doc["event"], record.event, ignore_unknown_fields=True)
    recorded: dt.datetime = doc["recorded_at"]
    # BSON dates come back naive (UTC) unless the client is tz-aware.
    record.recorded_at.FromDatetime(recorded if recorded.tzinfo else recorded.replace(tzinfo=dt.UTC))
    return record
