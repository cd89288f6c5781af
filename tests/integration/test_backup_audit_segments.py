"""Backups of the append-only audit store are incremental: each backup adds one segment of
the records appended since the last one (a growing trail is never dumped whole again); a
restore puts every segment back in order; records deleted from the primary are noticed and
kept by the backup."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.storage.object_store import StoreSettings
from services.audit.store import COLLECTION
from tests.servers import Servers
from tools import backup


async def _append(uri: str, database: str, chain: str, seqs: range) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        docs = [{"chain": chain, "seq": n, "event_id": f"{chain}-{n}", "hash": f"h{n}"} for n in seqs]
        await client[database][COLLECTION].insert_many(docs)
    finally:
        await client.close()


async def _records(uri: str, database: str) -> list[tuple[str, int]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        events = client[database][COLLECTION]
        return [(d["chain"], d["seq"]) async for d in events.find({}, sort=[("chain", 1), ("seq", 1)])]
    finally:
        await client.close()


async def _delete(uri: str, database: str, chain: str, seq: int) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        await client[database][COLLECTION].delete_one({"chain": chain, "seq": seq})
    finally:
        await client.close()


def _site(servers: Servers, tmp_path: Path, database: str, store: str) -> backup.Site:
    return backup.Site(
        store=StoreSettings((tmp_path / store).as_uri()),
        mongodb_uri=servers.mongodb_uri,
        databases={"audit": database},
    )


def _events(outcome: backup.Outcome) -> dict[str, Any]:
    entry: dict[str, Any] = outcome.manifest["databases"]["audit"]["collections"][COLLECTION]
    return entry


def test_each_backup_adds_only_the_records_appended_since(servers: Servers, tmp_path: Path, unique: str) -> None:
    database = f"backup_segments_{unique}"
    site = _site(servers, tmp_path, database, "store")
    (tmp_path / "store").mkdir()
    to = StoreSettings((tmp_path / "backup").as_uri())

    asyncio.run(_append(servers.mongodb_uri, database, "p0", range(1, 101)))
    asyncio.run(_append(servers.mongodb_uri, database, "p1", range(1, 51)))
    first = backup.backup(site, to)
    assert _events(first)["heads"] == {"p0": 100, "p1": 50}
    assert [s["documents"] for s in _events(first)["segments"]] == [150]

    # Nothing appended: nothing written for the trail.
    idle = backup.backup(site, to)
    assert _events(idle)["segments"] == _events(first)["segments"] and idle.blobs_written == 0

    # Appended to both chains and a new chain started: one more segment, of those only.
    asyncio.run(_append(servers.mongodb_uri, database, "p0", range(101, 111)))
    asyncio.run(_append(servers.mongodb_uri, database, "p2", range(1, 6)))
    third = backup.backup(site, to)
    assert [s["documents"] for s in _events(third)["segments"]] == [150, 15]
    assert _events(third)["heads"] == {"p0": 110, "p1": 50, "p2": 5}
    assert not third.warnings

    # A record deleted from the primary (tampering, or a broken migration): the backup says so,
    # and still holds it.
    asyncio.run(_delete(servers.mongodb_uri, database, "p1", 7))
    fourth = backup.backup(site, to)
    assert len(fourth.warnings) == 1 and "1 fewer records" in fourth.warnings[0]
    assert _events(fourth)["documents"] == 165

    # Restored into an empty database: every record, in order, the deleted one included.
    restored_db = f"backup_segments_restored_{unique}"
    (tmp_path / "restored").mkdir()
    manifest, counts, _ = backup.restore(to, _site(servers, tmp_path, restored_db, "restored"))
    assert manifest["sequence"] == 4 and counts == {f"{restored_db}.{COLLECTION}": 165}
    records = asyncio.run(_records(servers.mongodb_uri, restored_db))
    assert ("p1", 7) in records and len(records) == len(set(records)) == 165
