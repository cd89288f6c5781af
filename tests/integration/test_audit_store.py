"""The audit store on a real MongoDB-wire server: append, idempotency, tamper detection, concurrency."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import bson
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.json_format import ParseDict
from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import PermanentError
from dicomsafe.common.token_fingerprint import token_fingerprint
from dicomsafe.v1 import audit_pb2
from services.audit.chain import GENESIS, ChainVerifier, event_document, link_hash, link_hash_v2
from services.audit.checkpoints import Checkpoint
from services.audit.checkpoints import message as checkpoint_message
from services.audit.paging import BadPageToken, Filters, decode_token
from services.audit.store import COLLECTION, AuditStore, Head, chained_records
from tests.servers import Servers


def _event(actor: str = "dr.house", study: str = "1.2.3") -> audit_pb2.AuditEvent:
    event = audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        service="gateway",
        action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
        actor=actor,
        study_instance_uid=study,
        details={"bytes": "42"},
    )
    event.occurred_at.GetCurrentTime()
    return event


@pytest.fixture
async def client(servers: Servers) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    c: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    yield c
    await c.close()


@pytest.fixture
async def store(client: AsyncMongoClient[dict[str, Any]], unique: str) -> AuditStore:
    s = AuditStore(client, f"audit_{unique}")
    await s.ensure_indexes()
    return s


async def test_append_verify_and_query(store: AuditStore) -> None:
    for i in range(10):
        assert await store.append("c:0", _event(actor="dr.house" if i % 2 else "aud.ito", study="1.2.3")) == i + 1
    await store.append("c:1", _event(actor="tech.jane", study="9.9"))
    verdict = await store.verify()
    assert verdict.ok and verdict.chains == 2 and verdict.records == 11
    house = [r async for r in store.query(Filters(actor="dr.house"))]
    assert len(house) == 5 and all(r.event.actor == "dr.house" for r in house)
    assert [r.seq for r in house] == [2, 4, 6, 8, 10]
    assert len([r async for r in store.query(Filters(study_instance_uid="9.9"))]) == 1
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert [r async for r in store.query(Filters(since=future))] == []


async def test_redelivered_event_is_recorded_once(store: AuditStore) -> None:
    event = _event()
    assert await store.append("c:0", event) == 1
    assert await store.append("c:0", event) is None
    fresh = AuditStore.__new__(AuditStore)  # a restarted consumer with an empty head cache
    fresh.__dict__.update(store.__dict__, _heads={})
    assert await fresh.append("c:0", event) is None
    assert (await store.verify()).records == 1


async def test_tampering_is_named_by_chain_and_seq(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    for _ in range(8):
        await store.append("c:0", _event())
    raw = client[f"audit_{unique}"][COLLECTION]
    await raw.update_one({"chain": "c:0", "seq": 5}, {"$set": {"event.actor": "mallory"}})
    verdict = await store.verify()
    assert not verdict.ok
    assert [(b.chain, b.seq, b.reason) for b in verdict.breaks] == [("c:0", 5, "content does not match its hash")]


async def test_deleted_record_is_named(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    for _ in range(6):
        await store.append("c:0", _event())
    await client[f"audit_{unique}"][COLLECTION].delete_one({"chain": "c:0", "seq": 3})
    verdict = await store.verify("c:0")
    assert [(b.seq, b.reason) for b in verdict.breaks] == [(3, "record missing")]


async def test_concurrent_writers_never_fork_a_chain(client: AsyncMongoClient[dict[str, Any]], unique: str) -> None:
    a, b = AuditStore(client, f"audit_{unique}"), AuditStore(client, f"audit_{unique}")
    await a.ensure_indexes()

    async def write(store: AuditStore, n: int) -> list[int | None]:
        return [await store.append("c:0", _event()) for _ in range(n)]

    seqs_a, seqs_b = await asyncio.gather(write(a, 15), write(b, 15))
    seqs = [s for s in seqs_a + seqs_b if s is not None]
    assert sorted(seqs) == list(range(1, 31))
    verdict = await a.verify()
    assert verdict.ok and verdict.records == 30


async def test_bulk_append_is_chained_and_idempotent(store: AuditStore) -> None:
    first = [_event() for _ in range(5)]
    assert await store.append_many("c:0", first) == [1, 2, 3, 4, 5]
    again = _event()
    # A redelivered batch mixes recorded events, a new one, and one event twice.
    seqs = await store.append_many("c:0", [first[3], again, first[4], again, _event()])
    assert seqs == [None, 6, None, None, 7]
    verdict = await store.verify()
    assert verdict.ok and verdict.records == 7


async def test_concurrent_bulk_writers_never_fork_a_chain(
    client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    a, b = AuditStore(client, f"audit_{unique}"), AuditStore(client, f"audit_{unique}")
    await a.ensure_indexes()

    async def write(store: AuditStore) -> list[int | None]:
        out: list[int | None] = []
        for _ in range(5):
            out += await store.append_many("c:0", [_event() for _ in range(20)])
        return out

    seqs_a, seqs_b = await asyncio.gather(write(a), write(b))
    assert sorted(s for s in seqs_a + seqs_b if s is not None) == list(range(1, 201))
    assert (await a.verify()).ok


async def test_exposure_report_lists_what_a_subject_received(store: AuditStore) -> None:
    def disclosed(actor: str, patient: str, study: str, outcome: int) -> audit_pb2.AuditEvent:
        event = _event(actor=actor, study=study)
        event.patient_ref = patient
        event.outcome = outcome  # type: ignore[assignment]
        return event

    ok, denied = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS, audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
    decision = _event(actor="dr.evil", study="7.7")
    decision.action = audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION
    await store.append_many(
        "c:0",
        [
            disclosed("dr.evil", "aa" * 16, "1.1", ok),
            disclosed("dr.evil", "aa" * 16, "1.2", ok),
            disclosed("dr.evil", "bb" * 16, "2.1", ok),
            disclosed("dr.evil", "cc" * 16, "3.1", denied),  # refused: nothing disclosed
            disclosed("dr.house", "dd" * 16, "4.1", ok),
            decision,  # a decision alone discloses nothing
        ],
    )
    report = await store.exposure("dr.evil", None, None)
    assert report.events == 3
    assert report.patient_refs == {"aa" * 16, "bb" * 16}
    assert report.studies == {"1.1", "1.2", "2.1"}
    future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    assert (await store.exposure("dr.evil", future, None)).events == 0
    assert len([r async for r in store.query(Filters(patient_ref="aa" * 16))]) == 2


async def test_exposure_of_a_leaked_token_lists_only_what_was_released_under_it(store: AuditStore) -> None:
    """A breach notice for a stolen token names what that token reached, not everything its
    user legitimately saw with other tokens."""
    leaked, other = token_fingerprint("eyJ.leaked.token"), token_fingerprint("eyJ.other.token")

    def decided(fingerprint: str, decision_id: str) -> audit_pb2.AuditEvent:
        event = _event(actor="dr.house")
        event.action = audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION
        event.details.update({"decision_id": decision_id, "token_fingerprint": fingerprint})
        return event

    def released(decision_id: str, patient: str, study: str) -> audit_pb2.AuditEvent:
        event = _event(actor="dr.house", study=study)
        event.patient_ref = patient
        event.details["decision_id"] = decision_id
        return event

    def queried(decision_id: str, studies: str) -> audit_pb2.AuditEvent:
        event = _event(actor="dr.house", study="")
        event.action = audit_pb2.AuditAction.AUDIT_ACTION_STUDY_QUERIED
        event.details.update({"decision_id": decision_id, "studies": studies})
        return event

    await store.append_many(
        "t:0",
        [
            decided(leaked, "d1"),
            released("d1", "aa" * 16, "1.1"),
            decided(other, "d2"),
            released("d2", "bb" * 16, "2.1"),  # same user, another token: not part of the breach
            decided(leaked, "d3"),
            released("d3", "cc" * 16, "3.1"),
            released("d3", "cc" * 16, "3.1"),
            decided(leaked, "d4"),  # decided, never released: nothing disclosed
            decided(leaked, "d5"),
            queried("d5", "5.1,5.2"),  # a QIDO answer showed these studies' names and IDs
            decided(other, "d6"),
            queried("d6", "6.1"),
        ],
    )
    report = await store.exposure_of_token(leaked, None, None)
    assert report.queried_studies == {"5.1", "5.2"}
    assert report.events == 4
    assert report.patient_refs == {"aa" * 16, "cc" * 16} and report.studies == {"1.1", "3.1"}
    assert (await store.exposure_of_token(token_fingerprint("never.used"), None, None)).events == 0
    assert (await store.exposure("dr.house", None, None)).patient_refs == {"aa" * 16, "bb" * 16, "cc" * 16}


def _rich_event() -> audit_pb2.AuditEvent:
    """Every kind of field the event has: enums, a nanosecond timestamp, a map (with keys that
    are awkward in MongoDB), a repeated field, non-ASCII text."""
    event = audit_pb2.AuditEvent(
        event_id=str(uuid.uuid4()),
        service="authz",
        action=audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE,
        outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE,
        actor="dr.müller@klinik.example",
        actor_roles=["radiologist", "break-glass"],
        study_instance_uid="1.2.840.113619.2.55.3",
        sop_instance_uid="1.2.840.113619.2.55.3.1",
        object_id="obj-1",
        reason="Notfall — 急诊 ✓",
        trace_id="ab" * 16,
        details={"key.version": "7", "$where": "x", "": "empty", "size": "18446744073709551615", "z": ""},
        patient_ref="cd" * 16,
    )
    event.occurred_at.FromNanoseconds(1_700_000_000_123_456_789)
    return event


async def test_stored_event_round_trips_exactly(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    event = _rich_event()
    assert await store.append("c:0", event) == 1
    raw = await client[f"audit_{unique}"][COLLECTION].find_one({"chain": "c:0", "seq": 1})
    assert raw is not None
    assert raw["event"] == event_document(event) and raw["v"] == 2
    # What comes back from MongoDB is byte for byte what was hashed, so the hash recomputes.
    as_stored = client[f"audit_{unique}"].get_collection(
        COLLECTION, codec_options=CodecOptions(document_class=RawBSONDocument)
    )
    stored = await as_stored.find_one({"chain": "c:0", "seq": 1}, projection={"_id": 0})
    assert isinstance(stored, RawBSONDocument)
    assert bytes(stored["event"].raw) == bson.encode(event_document(event))
    assert list(stored) == ["chain", "seq", "v", "prev_hash", "event_id", "event", "recorded_at", "hash"]
    assert raw["hash"] == link_hash_v2(GENESIS, bytes(stored.raw)[4:-76])
    assert ChainVerifier("c:0").feed_bson(bytes(stored.raw)) is None
    assert raw["event_id"] == event.event_id
    (record,) = [r async for r in store.query(Filters(object_id="obj-1"))]
    assert record.event == event
    assert (record.chain, record.seq, record.prev_hash, record.hash) == ("c:0", 1, GENESIS, raw["hash"])
    assert (await store.verify()).ok


async def test_an_unstorable_event_is_refused_for_good_and_the_chain_goes_on(store: AuditStore) -> None:
    bad = _event()
    bad.details["nul\x00key"] = "x"  # valid protobuf, but no BSON key may hold a NUL byte
    good = [_event() for _ in range(2)]
    # As a batch: refused as a whole (the consume loop then redoes it record by record) ...
    with pytest.raises(PermanentError):
        await store.append_many("c:0", [good[0], bad, good[1]])
    # ... one by one: the bad event is dead-lettered, never retried forever, the rest is chained.
    assert await store.append("c:0", good[0]) == 1
    with pytest.raises(PermanentError) as refused:
        await store.append("c:0", bad)
    assert "nul" not in refused.value.reason  # content is never quoted
    assert await store.append("c:0", good[1]) == 2
    verdict = await store.verify()
    assert verdict.ok and verdict.records == 2


async def test_swapped_event_id_is_named(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    for _ in range(4):
        await store.append("c:0", _event())
    # Renaming the idempotency key would let a redelivery of event 2 be recorded a second time.
    await client[f"audit_{unique}"][COLLECTION].update_one({"chain": "c:0", "seq": 2}, {"$set": {"event_id": "x"}})
    verdict = await store.verify()
    assert [(b.chain, b.seq, b.reason) for b in verdict.breaks] == [("c:0", 2, "event_id does not match the event")]


async def test_a_chain_deleted_entirely_is_caught_by_its_checkpoint(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    # A real ed25519 key in the format Vault Transit signs with (vault:v<N>:<base64>).
    key = Ed25519PrivateKey.generate()

    def sign(chain: str, seq: int, head: str) -> Checkpoint:
        signature = base64.b64encode(key.sign(checkpoint_message(chain, seq, head))).decode()
        return Checkpoint(chain, seq, head, f"vault:v1:{signature}")

    for chain in ("c:0", "c:1"):
        for _ in range(5):
            await store.append(chain, _event())
        head = store.heads()[chain]
        await store.add_checkpoint(sign(chain, head.seq, head.hash))
    keys = {1: key.public_key()}
    verdict = await store.verify(public_keys=keys)
    assert verdict.ok and (verdict.chains, verdict.records, verdict.checkpoints) == (2, 10, 2)

    await client[f"audit_{unique}"][COLLECTION].delete_many({"chain": "c:1"})
    verdict = await store.verify(public_keys=keys)
    assert [(b.chain, b.seq, b.reason) for b in verdict.breaks] == [
        ("c:1", 1, "chain truncated: a signed checkpoint reaches seq 5")
    ]
    # Without the public keys only the hash chain is checked: the loss is invisible there.
    assert (await store.verify()).ok


@pytest.mark.parametrize(
    "edit",
    [
        {"$set": {"recorded_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}},
        {"$set": {"event.details.bytes": 42}},  # the same digits as another type
        {"$unset": {"v": ""}},
        {"$set": {"event.reason": "edited"}},
    ],
    ids=["recorded-at-moved", "type-changed", "version-dropped", "field-added"],
)
async def test_every_covered_field_is_bound(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str, edit: dict[str, Any]
) -> None:
    for _ in range(4):
        await store.append("c:0", _event())
    await client[f"audit_{unique}"][COLLECTION].update_one({"chain": "c:0", "seq": 3}, edit)
    verdict = await store.verify()
    assert [(b.seq, b.reason) for b in verdict.breaks] == [(3, "content does not match its hash")]


async def test_version_1_records_still_verify_and_the_chain_goes_on(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """Records written before version 2 (JSON canonical form, no `v`) keep verifying."""
    prev = GENESIS
    legacy = []
    for seq in (1, 2):
        event = event_document(_event())
        digest = link_hash(prev, "c:0", seq, event)
        legacy.append(
            {
                "chain": "c:0",
                "seq": seq,
                "event_id": event["event_id"],
                "prev_hash": prev,
                "hash": digest,
                "event": event,
                "recorded_at": dt.datetime.now(dt.UTC),
            }
        )
        prev = digest
    await client[f"audit_{unique}"][COLLECTION].insert_many(legacy)
    assert await store.append("c:0", _event()) == 3
    verdict = await store.verify()
    assert verdict.ok and verdict.records == 3
    await client[f"audit_{unique}"][COLLECTION].update_one({"seq": 2}, {"$set": {"event.actor": "mallory"}})
    assert [(b.seq, b.reason) for b in (await store.verify()).breaks] == [(2, "content does not match its hash")]


async def test_an_untouched_chain_of_100000_events_verifies_clean(store: AuditStore) -> None:
    """The issue's scale check: 100,000 chained events, appended in consumer-sized batches by the
    store's own code, verify with no break and the exact count."""
    total, batch = 100_000, 1_000
    for start in range(0, total, batch):
        seqs = await store.append_many("big:0", [_event(actor=f"user-{(start + i) % 97}") for i in range(batch)])
        assert seqs == list(range(start + 1, start + batch + 1))
    verdict = await store.verify()
    assert verdict.ok, verdict.breaks
    assert verdict.records == total


def _forged(seq: int, prev_hash: str, event: audit_pb2.AuditEvent | None = None) -> dict[str, Any]:
    """A record in the current format (version 2), correctly hashed over its own content and
    linked to ``prev_hash``: anyone can compute SHA-256, no key is needed for that."""
    event = event or _event(actor="mallory")
    (record,) = chained_records("c:0", Head(seq - 1, prev_hash), [(event.event_id, bson.encode(event_document(event)))])
    return record


def _signer() -> tuple[Ed25519PrivateKey, Callable[[str, int, str], Checkpoint]]:
    key = Ed25519PrivateKey.generate()

    def sign(chain: str, seq: int, head: str) -> Checkpoint:
        signature = base64.b64encode(key.sign(checkpoint_message(chain, seq, head))).decode()
        return Checkpoint(chain, seq, head, f"vault:v1:{signature}")

    return key, sign


async def test_inserted_record_with_shifted_seqs_is_named(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """A forged record put between seq 3 and 4, the later records' seq shifted up by one to make
    room. The forgery links to 3 (it is well formed); every real record moved no longer hashes
    to its own hash (the seq is hashed), and each is named; what precedes the forgery is intact."""
    for _ in range(6):
        await store.append("c:0", _event())
    raw = client[f"audit_{unique}"][COLLECTION]
    third = await raw.find_one({"chain": "c:0", "seq": 3})
    assert third is not None
    for seq in (6, 5, 4):  # from the end, so the unique (chain, seq) index never collides
        await raw.update_one({"chain": "c:0", "seq": seq}, {"$set": {"seq": seq + 1}})
    await raw.insert_one(_forged(4, str(third["hash"])))
    verdict = await store.verify()
    assert [(b.chain, b.seq, b.last, b.reason) for b in verdict.breaks] == [
        ("c:0", 5, 7, "content does not match its hash")
    ]
    assert [(r.seq_from, r.seq_to) for r in verdict.intact] == [(1, 4)]


async def test_inserted_record_with_the_tail_rechained_is_caught_by_a_checkpoint(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """The same insertion by someone who also recomputes every later link: the hash chain is
    consistent again, but the record at the signed head's seq no longer has the signed hash."""
    key, sign = _signer()
    for _ in range(6):
        await store.append("c:0", _event())
    head = store.heads()["c:0"]
    await store.add_checkpoint(sign("c:0", head.seq, head.hash))
    raw = client[f"audit_{unique}"][COLLECTION]
    later = [doc async for doc in raw.find({"chain": "c:0", "seq": {"$gte": 4}}, sort=[("seq", 1)])]
    third = await raw.find_one({"chain": "c:0", "seq": 3})
    assert third is not None and len(later) == 3
    await raw.delete_many({"chain": "c:0", "seq": {"$gte": 4}})
    forged = [_forged(4, str(third["hash"]))]
    for doc in later:
        event = audit_pb2.AuditEvent()
        ParseDict(doc["event"], event)
        forged.append(_forged(len(forged) + 4, str(forged[-1]["hash"]), event))
    await raw.insert_many(forged)
    assert (await store.verify()).ok  # the hash chain alone cannot tell
    verdict = await store.verify(public_keys={1: key.public_key()})
    assert [(b.chain, b.seq, b.reason) for b in verdict.breaks] == [
        ("c:0", 6, "record differs from its signed checkpoint")
    ]


async def test_inserted_record_with_a_duplicated_seq_is_named(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """A forged record with the seq of a real one (possible once the unique index is dropped):
    the chain holds two records at seq 3. Whichever the server returns first links; the other
    is named at seq 3, and the chain goes on intact from the first."""
    for _ in range(5):
        await store.append("c:0", _event())
    raw = client[f"audit_{unique}"][COLLECTION]
    await raw.drop_index("chain_seq")
    second = await raw.find_one({"chain": "c:0", "seq": 2})
    assert second is not None
    await raw.insert_one(_forged(3, str(second["hash"])))
    verdict = await store.verify()
    assert [(b.chain, b.seq, b.reason) for b in verdict.breaks] == [("c:0", 3, "sequence out of order")]
    assert verdict.records == 6 and [(r.seq_from, r.seq_to) for r in verdict.intact] == [(1, 3), (4, 5)]


async def test_reordered_records_are_named(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """Two records' seq swapped (3 <-> 4): both are still in the chain, in the wrong order; as
    the seq is hashed, each is named as not matching its hash, and 5 on links to the moved 4."""
    for _ in range(6):
        await store.append("c:0", _event())
    raw = client[f"audit_{unique}"][COLLECTION]
    await raw.update_one({"chain": "c:0", "seq": 3}, {"$set": {"seq": -3}})
    await raw.update_one({"chain": "c:0", "seq": 4}, {"$set": {"seq": 3}})
    await raw.update_one({"chain": "c:0", "seq": -3}, {"$set": {"seq": 4}})
    verdict = await store.verify()
    assert [(b.chain, b.seq, b.last, b.reason) for b in verdict.breaks] == [
        ("c:0", 3, 4, "content does not match its hash")
    ]
    assert [(r.seq_from, r.seq_to) for r in verdict.intact] == [(1, 2), (5, 6)]


async def test_query_filters_by_action_and_outcome(store: AuditStore) -> None:
    A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
    events = []
    for i in range(12):
        event = _event(actor="dr.house")
        event.action = (A.AUDIT_ACTION_INSTANCE_RETRIEVED, A.AUDIT_ACTION_ACCESS_DECISION, A.AUDIT_ACTION_KEY_ROTATED)[
            i % 3
        ]
        event.outcome = Out.AUDIT_OUTCOME_DENIED if i % 4 == 0 else Out.AUDIT_OUTCOME_SUCCESS
        events.append(event)
    await store.append_many("c:0", events)
    decisions = Filters(actions=("AUDIT_ACTION_ACCESS_DECISION",))
    assert [r.seq async for r in store.query(decisions)] == [2, 5, 8, 11]
    denied = Filters(outcomes=("AUDIT_OUTCOME_DENIED",))
    assert [r.seq async for r in store.query(denied)] == [1, 5, 9]
    both = Filters(
        actor="dr.house",
        actions=("AUDIT_ACTION_ACCESS_DECISION", "AUDIT_ACTION_KEY_ROTATED"),
        outcomes=("AUDIT_OUTCOME_DENIED",),
    )
    assert [r.seq async for r in store.query(both)] == [5, 9]


async def test_walking_every_page_yields_each_record_once(store: AuditStore) -> None:
    """Records of several chains recorded in the same milliseconds (one batch shares its
    recorded_at): the pages follow (recorded_at, chain, seq), no record twice, none missed —
    even with records appended between pages."""
    for _ in range(4):
        for chain in ("c:1", "c:0", "c:2"):
            await store.append_many(chain, [_event(actor="dr.house" if i % 3 else "aud.ito") for i in range(9)])
    expected = [(r.chain, r.seq) async for r in store.query(Filters(), 10_000)]
    assert len(expected) == 108

    async def walk(filters: Filters, size: int, appended_midway: bool = False) -> list[tuple[str, int]]:
        seen: list[tuple[str, int]] = []
        after, pages = None, 0
        while True:
            records, token = await store.query_page(filters, size, after)
            seen += [(r.chain, r.seq) for r in records]
            pages += 1
            if not token:
                return seen
            assert len(records) == size
            after = decode_token(token, filters)
            if appended_midway and pages == 2:
                await store.append_many("c:0", [_event() for _ in range(3)])

    assert await walk(Filters(), 7) == expected
    assert await walk(Filters(), 108) == expected  # one full page, no empty one after it
    house = [(r.chain, r.seq) async for r in store.query(Filters(actor="dr.house"), 10_000)]
    assert len(house) == 72 and await walk(Filters(actor="dr.house"), 5) == house
    walked = await walk(Filters(), 10, appended_midway=True)
    assert walked[:108] == expected and len(walked) == 111 and len(set(walked)) == 111
    # A token only continues the query it came from.
    _, token = await store.query_page(Filters(actor="dr.house"), 5)
    with pytest.raises(BadPageToken):
        decode_token(token, Filters(actor="aud.ito"))
    with pytest.raises(BadPageToken):
        decode_token("not-a-token", Filters())


async def test_every_query_walks_an_index_in_query_order(
    store: AuditStore, client: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """Each filter (and the time range) has an index ending in (recorded_at, chain, seq), so a
    page is an index walk from the token's position, never a sort of everything matching."""
    names = {ix["name"]: list(ix["key"]) async for ix in await client[f"audit_{unique}"][COLLECTION].list_indexes()}
    order = ["recorded_at", "chain", "seq"]
    assert names["recorded_order"] == order
    for name, field in (
        ("actor_order", "event.actor"),
        ("study_order", "event.study_instance_uid"),
        ("object_order", "event.object_id"),
        ("patient_order", "event.patient_ref"),
    ):
        assert names[name] == [field, *order]
    # No index on action or outcome: they filter the walk (append throughput pays per index).
    assert len(names) == 1 + 7  # _id and the store's seven, as before
    for _ in range(3):
        await store.append_many("c:0", [_event(actor=f"u{i}", study=f"1.{i}") for i in range(20)])
    _, token = await store.query_page(Filters(actor="u1"), 1)
    after = decode_token(token, Filters(actor="u1"))
    raw = client[f"audit_{unique}"][COLLECTION]
    for flt, index in (
        (Filters(actor="u1"), "actor_order"),
        (Filters(study_instance_uid="1.2", actions=("AUDIT_ACTION_INSTANCE_RETRIEVED",)), "study_order"),
        (Filters(since=dt.datetime(2020, 1, 1), outcomes=("AUDIT_OUTCOME_SUCCESS",)), "recorded_order"),
        (Filters(actor="u1"), "actor_order"),
    ):
        query = after.continue_after(flt.mongo()) if flt.actor else flt.mongo()
        assert flt.index() == index
        plan = await raw.find(query, hint=index).sort([("recorded_at", 1), ("chain", 1), ("seq", 1)]).explain()
        assert _index_names(plan["queryPlanner"]["winningPlan"]) == {index}, (flt, plan)
    # A database provisioned before: the single-field forms are replaced, not kept beside.
    await raw.drop_index("actor_order")
    await raw.create_index("event.actor", name="actor")
    await store.ensure_indexes()
    again = {ix["name"] async for ix in await raw.list_indexes()}
    assert again == set(names)


def _index_names(stage: dict[str, Any]) -> set[str]:
    """Every index an explained plan scans (its IXSCAN stages, at any depth)."""
    names = {str(stage["indexName"])} if stage.get("stage") == "IXSCAN" else set()
    for child in [stage.get("inputStage"), *stage.get("inputStages", [])]:
        if isinstance(child, dict):
            names |= _index_names(child)
    return names
