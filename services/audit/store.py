"""The audit store: append-only, hash-chained records in their own MongoDB database.

The code only ever inserts and finds (the database user is meant to have nothing else), so
a record, once written, changes only by tampering — which verification detects.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import ParseDict
from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from dicomsafe.common.kafka import TransientError
from dicomsafe.v1 import audit_pb2
from services.audit.chain import GENESIS, Break, ChainVerifier, event_document, link_hash
from services.audit.checkpoints import Checkpoint, signature_valid

log = logging.getLogger("dicomsafe.audit.store")

COLLECTION = "events"
CHECKPOINTS = "checkpoints"


@dataclass
class Head:
    seq: int
    hash: str


@dataclass(frozen=True)
class Verdict:
    chains: int
    records: int
    breaks: list[Break]
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks


class AuditStore:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        # Majority + journal: an acknowledged insert survives a crash, so the offset may be committed.
        self._events = client[database].get_collection(COLLECTION, write_concern=WriteConcern(w="majority", j=True))
        self._heads: dict[str, Head] = {}
        self._checkpoints = client[database].get_collection(
            CHECKPOINTS, write_concern=WriteConcern(w="majority", j=True)
        )

    async def ensure_indexes(self) -> None:
        await self._events.create_index([("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="chain_seq")
        await self._events.create_index("event_id", unique=True, name="event_id")
        await self._events.create_index("event.study_instance_uid", name="study")
        await self._events.create_index("event.actor", name="actor")
        await self._events.create_index("event.object_id", name="object")
        await self._events.create_index("event.patient_ref", name="patient")
        await self._events.create_index("recorded_at", name="recorded_at")
        await self._checkpoints.create_index([("chain", ASCENDING), ("seq", ASCENDING)], unique=True, name="chain_seq")

    async def check_indexes(self) -> None:
        """The service's own user may not create indexes: refuse to run without them, since
        the unique ones are what keep chains from forking and events from doubling."""
        names = {ix["name"] async for ix in await self._events.list_indexes()}
        missing = {"chain_seq", "event_id"} - names
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
        docs_events = [(event.event_id, event_document(event)) for event in events]
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
                records, prev, seq = [], head.hash, head.seq
                for i in pending:
                    seq += 1
                    event_id, doc_event = docs_events[i]
                    digest = link_hash(prev, chain, seq, doc_event)
                    records.append(
                        {
                            "chain": chain,
                            "seq": seq,
                            "event_id": event_id,
                            "prev_hash": prev,
                            "hash": digest,
                            "event": doc_event,
                            "recorded_at": dt.datetime.now(dt.UTC),
                        }
                    )
                    prev = digest
                try:
                    await self._events.insert_many(records, ordered=True)
                except BulkWriteError as exc:
                    errors = exc.details.get("writeErrors", [])
                    failed_at = int(errors[0]["index"]) if errors else 0
                    self._mark_inserted(chain, records[:failed_at], pending, results, seen)
                    pending = pending[failed_at:]
                    if errors and errors[0].get("code") == 11000 and "event_id" in errors[0].get("keyPattern", {}):
                        seen.add(docs_events[pending[0]][0])  # recorded by an earlier delivery
                        pending = pending[1:]
                    else:
                        await self._load_head(chain)
                    continue
                self._mark_inserted(chain, records, pending, results, seen)
                return results
        except PyMongoError as exc:
            self._heads.pop(chain, None)  # the head is unknown after a failed write
            raise TransientError(f"MongoDB unavailable ({type(exc).__name__})") from None
        raise TransientError("could not claim sequence numbers")

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

    async def verify(self, chain: str = "", public_keys: dict[int, Ed25519PublicKey] | None = None) -> Verdict:
        """Recompute every chain; with ``public_keys``, also check every signed checkpoint:
        its signature, that the record at its seq has its hash, and that the chain still
        reaches it (a shorter chain was truncated)."""
        chains = [chain] if chain else sorted(await self._events.distinct("chain"))
        total, breaks, checked_cps = 0, [], 0
        for name in chains:
            cps: dict[int, Checkpoint] = {}
            if public_keys is not None:
                async for doc in self._checkpoints.find({"chain": name}, sort=[("seq", ASCENDING)]):
                    cp = Checkpoint(doc["chain"], int(doc["seq"]), doc["hash"], doc["signature"])
                    checked_cps += 1
                    if not signature_valid(public_keys, cp):
                        breaks.append(Break(name, cp.seq, "checkpoint signature invalid"))
                        continue
                    cps[cp.seq] = cp
            verifier = ChainVerifier(name)
            broken: Break | None = None
            last_seq = 0
            async for doc in self._events.find({"chain": name}, sort=[("seq", ASCENDING)], batch_size=1000):
                broken = verifier.feed(doc)
                if broken:
                    break
                last_seq = int(doc["seq"])
                signed = cps.get(last_seq)
                if signed is not None and signed.hash != doc["hash"]:
                    broken = Break(name, last_seq, "record differs from its signed checkpoint")
                    break
            if broken is None and cps and max(cps) > last_seq:
                broken = Break(name, last_seq + 1, f"chain truncated: a signed checkpoint reaches seq {max(cps)}")
            if broken:
                breaks.append(broken)
            total += verifier.checked
        return Verdict(len(chains), total, breaks, checked_cps)

    async def exposure(self, actor: str, since: dt.datetime | None, until: dt.datetime | None) -> ExposureReport:
        flt: dict[str, Any] = {
            "event.actor": actor,
            "event.action": {"$in": _DISCLOSURES},
            "event.outcome": audit_pb2.AuditOutcome.Name(audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS),
        }
        if since or until:
            flt["recorded_at"] = {k: v for k, v in (("$gte", since), ("$lt", until)) if v}
        patients: set[str] = set()
        studies: set[str] = set()
        objects: set[str] = set()
        events = 0
        async for doc in self._events.find(flt, projection={"event": 1}, batch_size=1000):
            event = doc["event"]
            events += 1
            for target, field in ((patients, "patient_ref"), (studies, "study_instance_uid"), (objects, "object_id")):
                if event.get(field):
                    target.add(str(event[field]))
        return ExposureReport(actor, events, frozenset(patients), frozenset(studies), frozenset(objects))

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

    async def query(
        self,
        *,
        patient_ref: str = "",
        study_instance_uid: str = "",
        actor: str = "",
        object_id: str = "",
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int = 100,
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        flt: dict[str, Any] = {}
        if patient_ref:
            flt["event.patient_ref"] = patient_ref
        if study_instance_uid:
            flt["event.study_instance_uid"] = study_instance_uid
        if actor:
            flt["event.actor"] = actor
        if object_id:
            flt["event.object_id"] = object_id
        if since or until:
            flt["recorded_at"] = {k: v for k, v in (("$gte", since), ("$lt", until)) if v}
        cursor = self._events.find(flt, sort=[("recorded_at", ASCENDING)], limit=max(1, min(limit, 10_000)))
        async for doc in cursor:
            yield to_record(doc)


@dataclass(frozen=True)
class ExposureReport:
    """What one subject actually received in a time window (GDPR art. 33/34 breach notices)."""

    actor: str
    events: int
    patient_refs: frozenset[str]
    studies: frozenset[str]
    objects: frozenset[str]


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
