"""Backups of what a site cannot rebuild, and their restore: the sealed objects, the study
index, the audit store (records and signed checkpoints, byte for byte, so the restored chains
verify) and the grant store, copied to a second location (a directory or an S3 bucket/prefix).

    python -m tools.backup backup  --to URL          # incremental; prints the manifest
    python -m tools.backup restore --from URL [--sequence N]   # into empty stores
    python -m tools.backup list    --from URL

The backup is itself an object store (``dicomsafe.storage.object_store``: the same two backends,
so the same promises: nothing half-written is visible, nothing is ever deleted):
- each sealed object under its own id, byte for byte (sealed bytes only: a backup holds no
  plaintext and no key; Vault's keys are backed up by a Vault snapshot, see docs/operations.md);
- each database collection as one blob of its documents' raw BSON, named by its SHA-256, so a
  collection unchanged since the last backup is not written again; the audit store's
  append-only collections (records, checkpoints, forwarding marks) as segments instead, each
  backup adding one blob of the records past each chain's head in the previous one;
- manifest N (JSON) under an id derived from N: what backup N holds, each object's and blob's
  SHA-256, and the SHA-256 of manifest N-1 (a chain: an altered older manifest is noticed).

Incremental: an object whose bytes match the previous manifest's hash and which the backup
holds is not copied again (a rewrap changes an object's bytes: it is copied again). Databases
are dumped before the objects are listed, so every object the dumped index names is in the
backup. What happens after the dump is what a restore loses (the RPO).

Sources and targets come from the same environment as the services: ``CRYPTO_STORE_URL`` (and
``S3_*``), ``MONGODB_URI`` (an administrator: it reads and writes every database),
``GATEWAY_INDEX_DATABASE``, ``AUDIT_MONGODB_DB``, ``AUTHZ_MONGODB_DB``; the backup location's S3
credentials from ``BACKUP_S3_*`` (else the ``S3_*`` ones).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from dicomsafe.common.config import env_opt, env_secret, env_str
from dicomsafe.storage.object_store import (
    COPY_BLOCK,
    CopyMismatch,
    ObjectStore,
    S3Settings,
    StoreSettings,
    copy_verified,
    open_store,
    sha256_of,
)
from dicomsafe.storage.store_tiered import TieredStore
from services.audit.store import CHECKPOINTS, FORWARDED
from services.audit.store import COLLECTION as EVENTS

FORMAT = "dicomsafe-backup/1"
# What each database is to the site; its name comes from the services' settings.
ROLES = ("index", "audit", "authz")
_RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
INSERT_BATCH = 1000
# Collections never updated nor deleted from, chained by (chain, seq): backed up in segments,
# each backup adding only what was appended since the last one (the audit trail grows every
# second; dumping it whole every night would not scale).
APPEND_ONLY = frozenset({("audit", EVENTS), ("audit", CHECKPOINTS), ("audit", FORWARDED)})


class BackupError(RuntimeError):
    """A backup that cannot be trusted: a hash that does not match, a manifest missing."""


@dataclass(frozen=True)
class Site:
    """Where a site's data lives (the primary, or the fresh servers a restore fills)."""

    store: StoreSettings
    mongodb_uri: str = field(repr=False)
    databases: dict[str, str]
    # The archive tier, if the site has one: backed up with the hot tier (a restore puts every
    # object in the hot tier; the next tiering run moves the old ones again).
    archive: StoreSettings | None = None


@dataclass(frozen=True)
class Outcome:
    manifest: dict[str, Any]
    manifest_sha256: str
    seconds: float
    objects_copied: int
    blobs_written: int
    # Things the backup saw that an operator must look at (it completed regardless).
    warnings: list[str] = field(default_factory=list)


def manifest_id(sequence: int) -> str:
    """Manifest N's id: derived from N, so the newest is found by probing, on any backend."""
    return hashlib.sha256(f"dicomsafe backup manifest {sequence}".encode()).hexdigest()


def latest_sequence(backup: ObjectStore) -> int:
    n = 0
    while backup.exists(manifest_id(n + 1)):
        n += 1
    return n


def read_manifest(backup: ObjectStore, sequence: int) -> tuple[dict[str, Any], str]:
    """Manifest N and its SHA-256; checks that it names manifest N-1 by that one's hash."""
    try:
        with backup.open_read(manifest_id(sequence)) as f:
            raw = f.read()
    except FileNotFoundError:
        raise BackupError(f"no manifest {sequence} in the backup") from None
    manifest: dict[str, Any] = json.loads(raw)
    if manifest.get("format") != FORMAT or manifest.get("sequence") != sequence:
        raise BackupError(f"manifest {sequence} is not a {FORMAT} manifest of that sequence")
    if sequence > 1:
        with backup.open_read(manifest_id(sequence - 1)) as f:
            previous = hashlib.sha256(f.read()).hexdigest()
        if manifest.get("previous_sha256") != previous:
            raise BackupError(f"manifest {sequence - 1} differs from what manifest {sequence} recorded")
    return manifest, hashlib.sha256(raw).hexdigest()


def _copy(src: ObjectStore, dst: ObjectStore, object_id: str, sha256: str) -> None:
    try:
        copy_verified(src, dst, object_id, sha256)
    except CopyMismatch as exc:
        raise BackupError(str(exc)) from None


def _put_blob(backup: ObjectStore, spool: IO[bytes]) -> tuple[str, bool]:
    """A blob under its own SHA-256; (id, whether it was written now)."""
    spool.seek(0)
    digest = hashlib.sha256()
    while block := spool.read(COPY_BLOCK):
        digest.update(block)
    blob_id = digest.hexdigest()
    if backup.exists(blob_id):
        return blob_id, False
    spool.seek(0)
    pending = backup.begin_write(blob_id)
    try:
        while block := spool.read(COPY_BLOCK):
            pending.write(block)
        pending.commit()
    except BaseException:
        pending.abort()
        raise
    return blob_id, True


def documents(blob: IO[bytes]) -> Iterator[RawBSONDocument]:
    """The documents of a collection blob, as stored (raw BSON, one after the other)."""
    while head := blob.read(4):
        size = int.from_bytes(head, "little")
        yield RawBSONDocument(head + blob.read(size - 4))


async def _spool_blob(backup: ObjectStore, cursor: Any) -> tuple[dict[str, Any], bool, dict[str, int]]:
    """Writes what ``cursor`` yields as one blob: ({blob, documents}, written now, chain heads)."""
    count = 0
    heads: dict[str, int] = {}
    with tempfile.TemporaryFile() as spool:
        async for doc in cursor:
            spool.write(doc.raw)
            count += 1
            if "chain" in doc and "seq" in doc:
                chain, seq = str(doc["chain"]), int(doc["seq"])
                heads[chain] = max(seq, heads.get(chain, seq))
        blob_id, new = await asyncio.to_thread(_put_blob, backup, spool)
    return {"blob": blob_id, "documents": count}, new, heads


async def _dump_chained(
    collection: Any, backup: ObjectStore, previous: dict[str, Any] | None
) -> tuple[dict[str, Any], int, int]:
    """An append-only, hash-chained collection (the audit store's): only the records past each
    chain's head in the previous backup are dumped, as a new segment; the older segments are
    the previous backup's, unchanged. Returns (entry, blobs written, records missing: fewer now
    than backed up, which only a deletion in the primary explains)."""
    segments: list[dict[str, Any]] = list(previous.get("segments", [])) if previous else []
    heads: dict[str, int] = dict(previous.get("heads", {})) if previous else {}
    backed_up = sum(int(seg["documents"]) for seg in segments)
    order = [("chain", 1), ("seq", 1)]
    # Chains seen before, past their heads; then chains new since (one chain per partition: few).
    queries = [{"chain": chain, "seq": {"$gt": seq}} for chain, seq in sorted(heads.items())]
    queries.append({"chain": {"$nin": sorted(heads)}})
    segment, written, new_heads = await _spool_blob(backup, _chained_cursor(collection, queries, order))
    if segment["documents"]:
        segments.append(segment)
    heads.update(new_heads)
    total = backed_up + int(segment["documents"])
    missing = max(0, total - await collection.count_documents({}))
    entry = {"segments": segments, "heads": heads, "documents": total}
    return entry, int(written and segment["documents"] > 0), missing


async def _chained_cursor(collection: Any, queries: list[dict[str, Any]], order: list[tuple[str, int]]) -> Any:
    for query in queries:
        async for doc in collection.find(query, sort=order):
            yield doc


async def _dump_databases(
    site: Site, backup: ObjectStore, previous: dict[str, Any]
) -> tuple[dict[str, Any], int, list[str]]:
    client: AsyncMongoClient[RawBSONDocument] = AsyncMongoClient(site.mongodb_uri, document_class=RawBSONDocument)
    out: dict[str, Any] = {}
    written = 0
    warnings: list[str] = []
    try:
        for role, name in sorted(site.databases.items()):
            db = client.get_database(name, codec_options=_RAW)
            before = previous.get(role, {})
            earlier = before.get("collections", {}) if before.get("database") == name else {}
            collections: dict[str, Any] = {}
            for coll in sorted(await db.list_collection_names()):
                if (role, coll) in APPEND_ONLY:
                    entry, new, missing = await _dump_chained(db[coll], backup, earlier.get(coll))
                    if missing:
                        warnings.append(
                            f"{name}.{coll} holds {missing} fewer records than backed up: run the audit's "
                            "verify (records deleted from an append-only store); the backup keeps them"
                        )
                else:
                    # In _id order: an unchanged collection dumps to the same bytes (and blob).
                    entry, new, _ = await _spool_blob(backup, db[coll].find({}, sort=[("_id", 1)]))
                written += new
                collections[coll] = entry
            out[role] = {"database": name, "collections": collections}
    finally:
        await client.close()
    return out, written, warnings


def backup(site: Site, dest: StoreSettings) -> Outcome:
    """One backup (incremental against the newest one at ``dest``)."""
    started = time.monotonic()
    target = open_store(dest)
    previous_n = latest_sequence(target)
    previous: dict[str, Any] = {}
    previous_sha = ""
    if previous_n:
        previous, previous_sha = read_manifest(target, previous_n)
    taken_at = dt.datetime.now(dt.UTC)
    databases, blobs, warnings = asyncio.run(_dump_databases(site, target, previous.get("databases", {})))
    source: ObjectStore = open_store(site.store)
    if site.archive is not None:
        source = TieredStore(source, open_store(site.archive))
    known: dict[str, str] = previous.get("objects", {})
    objects: dict[str, str] = {}
    copied = 0
    for object_id in source.object_ids():
        sha = sha256_of(source, object_id)
        objects[object_id] = sha
        if known.get(object_id) == sha and target.exists(object_id):
            continue
        _copy(source, target, object_id, sha)
        copied += 1
    manifest = {
        "format": FORMAT,
        "sequence": previous_n + 1,
        "previous_sha256": previous_sha,
        # Everything the databases held at this instant is in; later changes are not (the RPO).
        "databases_dumped_at": taken_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "source_store": source.describe_location(),
        "databases": databases,
        "objects": objects,
    }
    raw = json.dumps(manifest, sort_keys=True, indent=1).encode()
    pending = target.begin_write(manifest_id(previous_n + 1))
    try:
        pending.write(raw)
        if not pending.commit():
            raise BackupError("another backup wrote the same manifest sequence at the same time")
    except BaseException:
        pending.abort()
        raise
    return Outcome(manifest, hashlib.sha256(raw).hexdigest(), time.monotonic() - started, copied, blobs, warnings)


async def _restore_blob(backup: ObjectStore, part: dict[str, Any], collection: Any, where: str) -> int:
    """Inserts one blob's documents in their order, its SHA-256 checked; returns how many."""
    count, batch = 0, []
    digest = hashlib.sha256()
    with backup.open_read(part["blob"]) as blob:
        for doc in documents(blob):
            digest.update(doc.raw)
            batch.append(doc)
            if len(batch) == INSERT_BATCH:
                await collection.insert_many(batch, ordered=True)
                count, batch = count + len(batch), []
    if digest.hexdigest() != part["blob"]:
        raise BackupError(f"a blob of {where} does not match its SHA-256")
    if batch:
        await collection.insert_many(batch, ordered=True)
        count += len(batch)
    if count != part["documents"]:
        raise BackupError(f"{where}: {count} documents in a blob that holds {part['documents']}")
    return count


async def _restore_databases(backup: ObjectStore, manifest: dict[str, Any], site: Site) -> dict[str, int]:
    client: AsyncMongoClient[RawBSONDocument] = AsyncMongoClient(site.mongodb_uri, document_class=RawBSONDocument)
    restored: dict[str, int] = {}
    try:
        for role, entry in sorted(manifest["databases"].items()):
            name = site.databases.get(role)
            if not name:
                continue
            db = client.get_database(name, codec_options=_RAW)
            for coll, info in sorted(entry["collections"].items()):
                if await db[coll].estimated_document_count():
                    raise BackupError(f"{name}.{coll} is not empty: restore fills fresh stores only")
                count = 0
                for part in info.get("segments", [info]):
                    count += await _restore_blob(backup, part, db[coll], f"{name}.{coll}")
                if count != info["documents"]:
                    raise BackupError(f"{name}.{coll}: {count} documents restored, {info['documents']} backed up")
                restored[f"{name}.{coll}"] = count
    finally:
        await client.close()
    return restored


def _claims(backup: ObjectStore, manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(SOP Instance UID, object id) of every indexed instance: the store's claims again."""
    index = manifest["databases"].get("index", {}).get("collections", {}).get("instances")
    if not index:
        return
    with backup.open_read(index["blob"]) as blob:
        for doc in documents(blob):
            yield str(doc["_id"]), str(doc["object_id"])


def restore(source: StoreSettings, site: Site, sequence: int = 0) -> tuple[dict[str, Any], dict[str, int], float]:
    """Backup ``sequence`` (0 = the newest) into ``site``'s empty stores; every hash checked."""
    started = time.monotonic()
    backup_store = open_store(source)
    sequence = sequence or latest_sequence(backup_store)
    if not sequence:
        raise BackupError("the backup location holds no backup")
    manifest, _ = read_manifest(backup_store, sequence)
    target = open_store(site.store)
    for object_id, sha in sorted(manifest["objects"].items()):
        if target.exists(object_id) and sha256_of(target, object_id) == sha:
            continue  # a resumed restore
        _copy(backup_store, target, object_id, sha)
    for sop_uid, object_id in _claims(backup_store, manifest):
        if target.claim(sop_uid, object_id) != object_id:
            raise BackupError("the target store claims an instance for another object: not a fresh store")
    counts = asyncio.run(_restore_databases(backup_store, manifest, site))
    return manifest, counts, time.monotonic() - started


def _backup_location(url: str) -> StoreSettings:
    if not url.startswith("s3://"):
        return StoreSettings(url=url if url.startswith("file://") else Path(url).resolve().as_uri())
    return StoreSettings(
        url=url,
        s3=S3Settings(
            endpoint_url=env_opt("BACKUP_S3_ENDPOINT_URL") or env_opt("S3_ENDPOINT_URL"),
            region=env_opt("BACKUP_S3_REGION") or env_opt("S3_REGION") or "us-east-1",
            access_key_id=env_secret("BACKUP_S3_ACCESS_KEY_ID") or env_secret("S3_ACCESS_KEY_ID"),
            secret_access_key=env_secret("BACKUP_S3_SECRET_ACCESS_KEY") or env_secret("S3_SECRET_ACCESS_KEY"),
        ),
    )


def site_from_env() -> Site:
    from dicomsafe.storage.store_env import archive_from_env, store_from_env

    return Site(
        store=store_from_env(),
        archive=archive_from_env(),
        mongodb_uri=env_secret("MONGODB_URI") or env_str("MONGODB_URI"),
        databases={
            "index": env_opt("GATEWAY_INDEX_DATABASE") or "dicomsafe_index",
            "audit": env_opt("AUDIT_MONGODB_DB") or "dicomsafe_audit",
            "authz": env_opt("AUTHZ_MONGODB_DB") or "dicomsafe_authz",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backup", help="an incremental backup of the site").add_argument("--to", required=True)
    rest = sub.add_parser("restore", help="a backup into empty stores (then provision and start the services)")
    rest.add_argument("--from", dest="source", required=True)
    rest.add_argument("--sequence", type=int, default=0, help="which backup (default: the newest)")
    sub.add_parser("list", help="the backups at a location").add_argument("--from", dest="source", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "backup":
            done = backup(site_from_env(), _backup_location(args.to))
            m = done.manifest
            print(
                f"backup {m['sequence']}: {len(m['objects'])} objects ({done.objects_copied} copied), "
                f"{done.blobs_written} database blobs written, {done.seconds:.1f}s; "
                f"manifest sha256 {done.manifest_sha256} (keep it apart from the backup)"
            )
            for warning in done.warnings:
                print(f"backup: WARNING: {warning}", file=sys.stderr)
        elif args.command == "restore":
            manifest, counts, seconds = restore(_backup_location(args.source), site_from_env(), args.sequence)
            print(
                f"restored backup {manifest['sequence']} (databases as of {manifest['databases_dumped_at']}): "
                f"{len(manifest['objects'])} objects, {sum(counts.values())} documents, {seconds:.1f}s"
            )
        else:
            location = open_store(_backup_location(args.source))
            if not latest_sequence(location):
                print(f"no backup at {location.describe_location()}")
            for n in range(1, latest_sequence(location) + 1):
                manifest, sha = read_manifest(location, n)
                print(f"{n}\t{manifest['databases_dumped_at']}\t{len(manifest['objects'])} objects\t{sha}")
    except BackupError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
