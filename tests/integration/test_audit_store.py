"""The audit store on a real MongoDB-wire server: append, idempotency, tamper detection, concurrency."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from dicomsafe.v1 import audit_pb2
from services.audit.store import COLLECTION, AuditStore
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
    house = [r async for r in store.query(actor="dr.house")]
    assert len(house) == 5 and all(r.event.actor == "dr.house" for r in house)
    assert [r.seq for r in house] == [2, 4, 6, 8, 10]
    assert len([r async for r in store.query(study_instance_uid="9.9")]) == 1
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert [r async for r in store.query(since=future)] == []


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
    assert len([r async for r in store.query(patient_ref="aa" * 16)]) == 2
