"""The disaster-recovery drill (`make dr-drill` runs it and prints the report): a populated site
is backed up (to S3 and to a local directory, the second backup of each incremental), its
primary stores are destroyed, the newest backup is restored into fresh servers (a new
MongoDB-wire server, a new S3 prefix), the services start on them, and the drill checks:
- every sealed object is there and is byte for byte the one backed up, and every instance opens
  through the restored gateway to the bytes originally sent;
- the study index equals the primary's, document for document;
- the audit trail verifies, hash chains and signed checkpoints, with every record backed up;
and reports RPO and RTO (written to ``dr-drill-report.json`` in the test's directory).

Vault is not part of this backup (its keys are not exportable by design; docs/operations.md:
a Raft snapshot), so the drill keeps the site's Vault.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pymongo import AsyncMongoClient

from dicomsafe.common.vault import VaultAuth, VaultSession
from dicomsafe.storage.object_store import StoreSettings, open_store, sha256_of
from services.audit.checkpoints import CheckpointSigner
from services.audit.store import CHECKPOINTS, COLLECTION
from tests.audit_trail import verify_directly
from tests.own_site import instances, publish, site_settings, wado_uri
from tests.restartable import OwnMongo
from tests.servers import Servers
from tests.service_runner import TEST_BUCKET, s3_settings
from tools import backup, dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack, StackSettings

FIRST, SECOND = 30, 20


def _site(settings: StackSettings) -> backup.Site:
    url = settings.crypto_store_url or (settings.work_dir / "store").as_uri()
    store = StoreSettings(url, settings.s3) if settings.s3 else StoreSettings(url)
    return backup.Site(
        store=store,
        mongodb_uri=settings.mongodb_uri,
        databases={"index": settings.index_db, "audit": settings.audit_db, "authz": settings.authz_db},
    )


async def _collections(uri: str, database: str) -> dict[str, list[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        db = client[database]
        return {
            c: [d async for d in db[c].find({}, sort=[("_id", 1)])] for c in sorted(await db.list_collection_names())
        }
    finally:
        await client.close()


async def _until_settled(settings: StackSettings, sops: set[str], keys: dict[int, Ed25519PublicKey]) -> int:
    """Every instance indexed and its storing audited, and a signed checkpoint at each chain's
    head; returns the number of audit records."""
    deadline = time.monotonic() + 180
    while True:
        index = await _collections(settings.mongodb_uri, settings.index_db)
        indexed = {str(d["_id"]) for d in index.get("instances", [])}
        verdict = await verify_directly(settings.mongodb_uri, settings.audit_db, keys)
        audit = await _collections(settings.mongodb_uri, settings.audit_db)
        stored = {
            d["event"].get("sop_instance_uid")
            for d in audit.get(COLLECTION, [])
            if d["event"].get("action") == "AUDIT_ACTION_INSTANCE_STORED"
        }
        heads: dict[str, int] = {}
        for d in audit.get(COLLECTION, []):
            heads[d["chain"]] = max(heads.get(d["chain"], 0), d["seq"])
        signed = {(d["chain"], d["seq"]) for d in audit.get(CHECKPOINTS, [])}
        if indexed >= sops and stored >= sops and all(head in signed for head in heads.items()):
            assert verdict.ok, list(verdict.breaks)
            return verdict.records
        assert time.monotonic() < deadline, "the site never settled"
        await asyncio.sleep(1)


def test_backup_destroy_restore_verify(servers: Servers, idp: LocalIssuer, own_mongo: OwnMongo, tmp_path: Path) -> None:
    unique = uuid.uuid4().hex[:8]
    primary = site_settings(servers, idp, tmp_path / "primary", "dr", partitions=2)
    locations = {
        "s3": StoreSettings(f"s3://{TEST_BUCKET}/dr-backup-{unique}", s3_settings(servers.s3)),
        "local": StoreSettings((tmp_path / "backup").as_uri()),
    }
    sent = instances(dicom_samples.ct_image, FIRST, 10)
    later = instances(dicom_samples.ct_image, SECOND, 500)
    stack = Stack(primary)
    try:
        stack.start()
        # The checkpoint signing key exists once the site's Vault setup ran (a fresh Vault: now).
        vault = VaultSession(VaultAuth(servers.vault_addr, token=servers.vault_token))
        keys = CheckpointSigner(vault).public_keys()
        asyncio.run(publish(primary, sent.values()))
        asyncio.run(_until_settled(primary, set(sent), keys))
        first = {name: backup.backup(_site(primary), where) for name, where in locations.items()}
        # The site goes on: more instances, reads (audited), then the last backup.
        asyncio.run(publish(primary, later.values()))
        sent |= later
        asyncio.run(_until_settled(primary, set(sent), keys))
        house = idp.token("dr.house")
        assert all(wado_uri(primary, house, data).content == data for data in list(later.values())[:3])
        asyncio.run(_until_settled(primary, set(sent), keys))
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"
    audit_records = asyncio.run(verify_directly(primary.mongodb_uri, primary.audit_db, keys)).records
    second = {name: backup.backup(_site(primary), where) for name, where in locations.items()}
    for name in locations:
        # Incremental: only the objects stored since the first backup were copied again.
        assert first[name].objects_copied == FIRST and second[name].objects_copied == SECOND
        assert second[name].manifest["previous_sha256"] == first[name].manifest_sha256
        # The audit trail too: the second backup added one segment, of the records since the first.
        events_then = first[name].manifest["databases"]["audit"]["collections"][COLLECTION]
        events_now = second[name].manifest["databases"]["audit"]["collections"][COLLECTION]
        assert events_now["segments"][:-1] == events_then["segments"]
        assert events_now["segments"][-1]["documents"] == audit_records - events_then["documents"] > 0
        assert events_now["documents"] == audit_records
    primary_index = asyncio.run(_collections(primary.mongodb_uri, primary.index_db))
    primary_audit = asyncio.run(_collections(primary.mongodb_uri, primary.audit_db))[COLLECTION]
    newest_record = max(r["recorded_at"] for r in primary_audit).replace(tzinfo=dt.UTC)
    primary_objects = second["s3"].manifest["objects"]
    dumped_at = dt.datetime.fromisoformat(second["s3"].manifest["databases_dumped_at"])

    # The disaster: the object store and every database are gone.
    destroyed_at = time.monotonic()
    shutil.rmtree(primary.work_dir / "store")

    async def drop() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(primary.mongodb_uri)
        try:
            for db in (primary.index_db, primary.audit_db, primary.authz_db):
                await client.drop_database(db)
        finally:
            await client.close()

    asyncio.run(drop())

    # Restore the newest backup (from S3) into fresh servers, and start the site on them.
    recovered = site_settings(
        servers,
        idp,
        tmp_path / "recovered",
        "dr",
        partitions=2,
        mongodb_uri=own_mongo.uri,
        crypto_store_url=f"s3://{TEST_BUCKET}/dr-recovered-{unique}",
        s3=s3_settings(servers.s3),
    )
    manifest, counts, restore_s = backup.restore(locations["s3"], _site(recovered))
    assert manifest["sequence"] == 2 and counts
    # What was restored is what the primary held (compared before any service touches it).
    store = open_store(_site(recovered).store)
    assert {oid: sha256_of(store, oid) for oid in store.object_ids()} == primary_objects
    assert asyncio.run(_collections(recovered.mongodb_uri, recovered.index_db)) == primary_index
    stack = Stack(recovered)
    try:
        stack.start()
        house = idp.token("dr.house")
        first_open = wado_uri(recovered, house, next(iter(sent.values())))
        assert first_open.status_code == 200, first_open.text
        rto_s = time.monotonic() - destroyed_at

        for data in sent.values():
            assert wado_uri(recovered, house, data).content == data
        verdict = asyncio.run(verify_directly(recovered.mongodb_uri, recovered.audit_db, keys))
        assert verdict.ok, list(verdict.breaks)
        assert verdict.records >= audit_records and verdict.checkpoints >= 1
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"

    # RPO: how much of what the primary recorded is newer than the restored backup's dump (here
    # nothing: the site was stopped before it; under load, up to the time between backups).
    rpo_s = max(0.0, (newest_record - dumped_at).total_seconds())
    assert rpo_s == 0.0
    report = {
        "instances": len(sent),
        "objects": len(primary_objects),
        "audit_records": audit_records,
        "backup_s": {name: round(o.seconds, 2) for name, o in second.items()},
        "objects_copied_incremental": {name: o.objects_copied for name, o in second.items()},
        "restore_s": round(restore_s, 2),
        "rto_s": round(rto_s, 2),
        "rpo_s": rpo_s,
        "audit_chains_verified": verdict.chains,
        "signed_checkpoints": verdict.checkpoints,
    }
    (tmp_path / "dr-drill-report.json").write_text(json.dumps(report, indent=1))
    print("DR drill report:", json.dumps(report))
