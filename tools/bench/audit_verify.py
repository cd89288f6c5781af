"""Audit verification: the rate of `verify` end to end against the server, and the share
that is ours (checking records already fetched), each projected to 1,000,000 events.

Baselines from the same run: the server handing over the same records in the same order
with nothing done to them, and the driver's generic decoding of those bytes (what any
verifier reading documents the ordinary way pays before hashing anything).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, cast

import bson
from pymongo import ASCENDING, AsyncMongoClient

from services.audit.bson_fields import documents
from services.audit.chain import GENESIS, ChainVerifier, event_document
from services.audit.store import COLLECTION, VERIFY_BATCH, AuditStore, Head, chained_records
from tools.bench.audit_append import _events
from tools.bench.results import Result, ratio

TARGET_SECONDS_PER_MILLION = 10.0
CHAIN = "bench:0"
_LOAD_BATCH = 5000


async def _measure(mongodb_uri: str, n: int) -> list[Result]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri)
    db_name = f"bench_verify_{uuid.uuid4().hex[:8]}"
    try:
        store = AuditStore(client, db_name)
        await store.ensure_indexes()
        # The records exactly as the store writes them, loaded in bulk (the append rate is
        # measured in audit_append).
        events = [(e.event_id, bson.encode(event_document(e))) for e in _events(n)]
        records = chained_records(CHAIN, Head(0, GENESIS), events)
        collection = client[db_name][COLLECTION]
        for i in range(0, n, _LOAD_BATCH):
            await collection.insert_many(records[i : i + _LOAD_BATCH], ordered=True)

        t0 = time.perf_counter()
        cursor = collection.find_raw_batches(
            {"chain": CHAIN}, projection={"_id": 0}, sort=[("seq", ASCENDING)], batch_size=VERIFY_BATCH
        )
        # A raw batch cursor yields BSON bytes (typed as documents by the driver).
        batches = [cast(bytes, b) async for b in cursor]
        fetch_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for batch in batches:
            bson.decode_all(batch)
        decode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        verifier = ChainVerifier(CHAIN)
        for batch in batches:
            for doc in documents(batch):
                assert verifier.feed_bson(doc) is None
        check_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        verdict = await store.verify()
        verify_s = time.perf_counter() - t0
        assert verdict.ok and verdict.records == n == verifier.checked
    finally:
        await client.drop_database(db_name)
        await client.close()
    per_million = 1_000_000 / n
    return [
        Result(
            "audit_verify_1M_projected",
            round(verify_s * per_million, 2),
            "s",
            round(fetch_s * per_million, 2),
            ratio(verify_s, fetch_s),
            TARGET_SECONDS_PER_MILLION,
            False,
        ),
        Result(
            "audit_verify_check_1M_projected",
            round(check_s * per_million, 2),
            "s",
            round(decode_s * per_million, 2),
            ratio(check_s, decode_s),
            TARGET_SECONDS_PER_MILLION,
            False,
        ),
    ]


def run(mongodb_uri: str, n: int) -> list[Result]:
    return asyncio.run(_measure(mongodb_uri, n))
