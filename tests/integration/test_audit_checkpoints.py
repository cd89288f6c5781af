"""Signed checkpoints on real OpenBao + MongoDB: a truncated chain tail and a forged checkpoint are caught."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.common.vault import VaultAuth, VaultSession
from dicomsafe.v1 import audit_pb2
from services.audit.app import run
from services.audit.checkpoint_topic import read_published
from services.audit.checkpoints import CheckpointSigner
from services.audit.store import CHECKPOINTS, COLLECTION, AuditStore, Verdict
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, running, with_tls
from tools import vault_setup
from tools.pki import Pki

EVENTS = 40
REPO = Path(__file__).resolve().parents[2]


async def _keys(vault_addr: str, vault_token: str) -> dict[int, Ed25519PublicKey]:
    signer = CheckpointSigner(VaultSession(VaultAuth(vault_addr, token=vault_token)))
    return await asyncio.to_thread(signer.public_keys)


async def _verify(store: AuditStore, vault_addr: str, vault_token: str) -> Verdict:
    # Straight on the database (what `python -m services.audit verify` does): a Verify RPC
    # would itself be audited, onto the very chain this test cuts.
    return await store.verify("", await _keys(vault_addr, vault_token))


async def test_truncation_and_forged_checkpoints_are_detected(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    database = f"audit_cp_{unique}"
    creds = vault_setup.provision_audit(servers.vault_addr, servers.vault_token)
    cfg = with_tls(
        await audit_config(
            servers.kafka_bootstrap,
            topics.prefix,
            servers.mongodb_uri,
            database,
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
            chain = str(cp["chain"])

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

            # Every checkpoint was also published on audit.checkpoints, as the protobuf contract.
            keys = await _keys(servers.vault_addr, servers.vault_token)
            published = await read_published(servers.kafka_bootstrap, topics.checkpoints, keys)
            assert published.breaks == [] and published.read >= 1
            assert published.newest[chain].seq == EVENTS and published.newest[chain].hash == cp["hash"]

            # Someone with database access deletes the tail together with every checkpoint: the
            # database alone now looks clean ...
            await admin[database][CHECKPOINTS].delete_many({})
            assert (await verify()).ok
            # ... the published checkpoints still name the truncation.
            with_published = await store.verify("", keys, published=published.newest)
            assert [(b.chain, b.seq, b.reason) for b in with_published.breaks] == [
                (chain, EVENTS - 4, f"chain truncated: a signed checkpoint reaches seq {EVENTS}")
            ]
            # The operator's command does the same from the topic.
            cli = await asyncio.to_thread(_cli_verify, servers, database, topics.prefix)
            assert cli.returncode == 1, cli.stdout + cli.stderr
            assert f"BROKEN {chain} at seq {EVENTS - 4}-{EVENTS}: chain truncated" in cli.stdout
    finally:
        await admin.close()


def _cli_verify(servers: Servers, database: str, prefix: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MONGODB_URI": servers.mongodb_uri,
        "AUDIT_MONGODB_DB": database,
        "KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": prefix,
        "VAULT_ADDR": servers.vault_addr,
        "VAULT_TOKEN": servers.vault_token,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "verify", "--published-checkpoints"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
