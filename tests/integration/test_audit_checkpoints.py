"""Signed checkpoints on real OpenBao + MongoDB: a truncated chain tail and a forged checkpoint are caught."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.common.mongo_users import user_uri
from dicomsafe.common.vault import VaultAuth, VaultSession
from dicomsafe.v1 import audit_pb2
from services.audit.app import run
from services.audit.checkpoints import CheckpointSigner
from services.audit.config import AuditConfig
from services.audit.provision import provision
from services.audit.store import CHECKPOINTS, COLLECTION, AuditStore, Verdict
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, free_port, running, with_tls
from tools import vault_setup
from tools.pki import Pki

EVENTS = 40


async def _verify(store: AuditStore, vault_addr: str, vault_token: str) -> Verdict:
    # Straight on the database (what `python -m services.audit verify` does): a Verify RPC
    # would itself be audited, onto the very chain this test cuts.
    keys = await asyncio.to_thread(CheckpointSigner(VaultSession(VaultAuth(vault_addr, token=vault_token))).public_keys)
    return await store.verify("", keys)


async def test_truncation_and_forged_checkpoints_are_detected(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    database = f"audit_cp_{unique}"
    user, password = await provision(servers.mongodb_uri, database)
    creds = vault_setup.provision_audit(servers.vault_addr, servers.vault_token)
    cfg = with_tls(
        AuditConfig(
            grpc_bind=f"127.0.0.1:{free_port()}",
            kafka_bootstrap=servers.kafka_bootstrap,
            topic_prefix=topics.prefix,
            group_id=f"audit-{unique}",
            mongodb_uri=user_uri(servers.mongodb_uri, database, user, password),
            database=database,
            vault=VaultAuth(addr=servers.vault_addr, role_id=creds.role_id, secret_id=creds.secret_id),
            checkpoint_interval_s=1,
        ),
        pki,
        "audit",
    )
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    try:
        for i in range(EVENTS):
            event = audit_pb2.AuditEvent(
                event_id=str(uuid.uuid4()),
                service="test",
                action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
                outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
                actor=f"user{i}",
            )
            await producer.send_and_wait(topics.audit, event.SerializeToString(), key=b"one-chain")
    finally:
        await producer.stop()

    admin: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    try:
        store = AuditStore(admin, database)

        async def verify() -> Verdict:
            return await _verify(store, servers.vault_addr, servers.vault_token)

        async with running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)):
            deadline = time.monotonic() + 60
            verdict = await verify()
            while (verdict.records < EVENTS or verdict.checkpoints == 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                verdict = await verify()
            assert verdict.ok and verdict.records == EVENTS and verdict.checkpoints >= 1
            cp = await admin[database][CHECKPOINTS].find_one(sort=[("seq", -1)])
            assert cp is not None and cp["seq"] == EVENTS

            # Cut the tail: the hash chain alone still verifies, the checkpoint does not.
            await admin[database][COLLECTION].delete_many({"seq": {"$gt": EVENTS - 5}})
            truncated = await verify()
            assert not truncated.ok
            assert [(b.seq, b.reason) for b in truncated.breaks] == [
                (EVENTS - 4, f"chain truncated: a signed checkpoint reaches seq {EVENTS}")
            ]

            # A checkpoint moved back to match the shortened chain is a forgery.
            await admin[database][CHECKPOINTS].update_one({"_id": cp["_id"]}, {"$set": {"seq": EVENTS - 5}})
            forged = await verify()
            assert "checkpoint signature invalid" in [b.reason for b in forged.breaks]
    finally:
        await admin.close()
