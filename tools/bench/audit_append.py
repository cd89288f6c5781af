"""Audit store: sustained hash-chained, durable append rate as a ratio of raw insert_many of
the same documents on the same server (the verify rate is in audit_verify).

The baselines insert records exactly as the store writes them (chain, seq, v, prev_hash,
event_id, event, recorded_at, hash), chained before the clock starts, in the consumer's batch
size with the same write concern: "raw" into a collection with no index but _id, "indexed"
into one with the store's indexes. So raw vs indexed is the server's index cost, and indexed
vs chained is ours (encoding, hashing, head bookkeeping)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import bson
from pymongo import AsyncMongoClient
from pymongo.write_concern import WriteConcern

from dicomsafe.v1 import audit_pb2
from services.audit.chain import GENESIS, event_document
from services.audit.store import COLLECTION, AuditStore, Head, chained_records
from tools.bench.results import Result, ratio

# The audit consumer's batch size (max records per partition fetch).
BATCH = 500
TARGET_APPEND_RATIO = 0.5


def _events(n: int) -> list[audit_pb2.AuditEvent]:
    out = []
    for i in range(n):
        event = audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            service="gateway",
            action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
            outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            actor=f"user{i % 50}",
            study_instance_uid=f"1.2.826.0.1.3680043.8.498.{i % 1000}",
            object_id=uuid.uuid4().hex * 2,
            details={"bytes": str(i), "purpose": "treatment"},
        )
        event.occurred_at.GetCurrentTime()
        out.append(event)
    return out


async def _measure(mongodb_uri: str, n: int) -> list[Result]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri)
    db_name = f"bench_audit_{uuid.uuid4().hex[:8]}"
    try:
        events = _events(n)
        raw = client[db_name].get_collection("raw", write_concern=WriteConcern(w="majority", j=True))
        shaped = [(e.event_id, bson.encode(event_document(e))) for e in events]
        records: list[dict[str, Any]] = []
        for i in range(0, n, BATCH):  # a batch shares recorded_at, as the store's do
            head = Head(len(records), records[-1]["hash"] if records else GENESIS)
            records += chained_records("raw:0", head, shaped[i : i + BATCH])
        # insert_many adds _id to each document: each collection gets its own copies.
        docs = [dict(r) for r in records]
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            await raw.insert_many(docs[i : i + BATCH], ordered=True)
        raw_rate = n / (time.perf_counter() - t0)

        # Same documents into a collection with the audit store's indexes: separates the cost
        # of the indexes (the server's) from the cost of chaining (ours).
        indexed_db = client[f"{db_name}_ix"]
        await AuditStore(client, f"{db_name}_ix").ensure_indexes()
        indexed = indexed_db.get_collection(COLLECTION, write_concern=WriteConcern(w="majority", j=True))
        chained_shape = [dict(r) for r in records]
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            await indexed.insert_many(chained_shape[i : i + BATCH], ordered=True)
        indexed_rate = n / (time.perf_counter() - t0)

        store = AuditStore(client, db_name)
        await store.ensure_indexes()
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            await store.append_many("bench:0", events[i : i + BATCH])
        append_rate = n / (time.perf_counter() - t0)

    finally:
        await client.drop_database(db_name)
        await client.drop_database(f"{db_name}_ix")
        await client.close()
    return [
        Result(
            "audit_append_chained",
            round(append_rate, 1),
            "events/s",
            round(raw_rate, 1),
            ratio(append_rate, raw_rate),
            TARGET_APPEND_RATIO,
            True,
        ),
        Result(
            "audit_append_vs_indexed_insert",
            round(append_rate, 1),
            "events/s",
            round(indexed_rate, 1),
            ratio(append_rate, indexed_rate),
            None,
            True,
        ),
    ]


def run(mongodb_uri: str, n: int) -> list[Result]:
    return asyncio.run(_measure(mongodb_uri, n))
