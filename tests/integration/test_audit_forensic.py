"""Forensic verification on the running service: one record altered and a later one deleted in
the same chain are both named, with the intact ranges between, by the Verify RPC, by the CLI
(straight on the database and through the service) and in published-checkpoint mode."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.common.vault import VaultAuth, VaultSession
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc
from services.audit.app import run
from services.audit.checkpoints import CheckpointSigner
from services.audit.store import CHECKPOINTS, COLLECTION, AuditStore
from services.authz.app import run as run_authz
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, authz_config, running, with_tls
from tools import vault_setup
from tools.pki import Pki

EVENTS = 40
ALTERED, DELETED = 5, 12
REPO = Path(__file__).resolve().parents[2]
Kind = audit_pb2.BreakKind
AUDITOR = "aud.ito"  # authz in development mode: subject ids trusted


def _breaks(response: audit_pb2.VerifyResponse) -> list[tuple[int, int, int, str]]:
    return [(b.seq, b.seq_to, b.kind, b.reason) for b in response.breaks]


def _assert_both_breaks_named(response: audit_pb2.VerifyResponse, chain: str, altered_id: str) -> None:
    assert not response.ok
    assert _breaks(response) == [
        (ALTERED, ALTERED, Kind.BREAK_KIND_RECORD_ALTERED, "content does not match its hash"),
        (DELETED, DELETED, Kind.BREAK_KIND_RECORDS_MISSING, "record missing"),
    ]
    assert {b.chain for b in response.breaks} == {chain}
    assert response.breaks[0].event_id == altered_id
    # The field clients before the forensic report read: still the first break of each chain.
    assert [(b.chain, b.seq) for b in response.broken] == [(chain, ALTERED)]
    ranges = [(r.chain, r.seq_from, r.seq_to) for r in response.intact]
    assert ranges[:2] == [(chain, 1, ALTERED - 1), (chain, ALTERED + 1, DELETED - 1)]
    # The rest runs to the head (the service's own records of these reads come after EVENTS),
    # confirmed by the signed checkpoint at EVENTS.
    (rest,) = response.intact[2:]
    assert (rest.seq_from, rest.seq_to >= EVENTS) == (DELETED + 1, True)
    assert rest.checkpoints >= 1 and rest.last_checkpoint_seq >= EVENTS


def _cli(
    servers: Servers, database: str, prefix: str, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MONGODB_URI": servers.mongodb_uri,
        "AUDIT_MONGODB_DB": database,
        "KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": prefix,
        "VAULT_ADDR": servers.vault_addr,
        "VAULT_TOKEN": servers.vault_token,
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "verify", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_cli_names_both(out: subprocess.CompletedProcess[str], chain: str, altered_id: str) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    altered = f"BROKEN {chain} at seq {ALTERED}: content does not match its hash"
    assert f"{altered} (record_altered, event {altered_id})" in lines
    assert f"BROKEN {chain} at seq {DELETED}: record missing (records_missing)" in lines
    assert any(line.startswith(f"INTACT {chain} seq 1-{ALTERED - 1} (") for line in lines)
    assert any(line.startswith(f"INTACT {chain} seq {ALTERED + 1}-{DELETED - 1} (") for line in lines)
    assert any(line.startswith(f"INTACT {chain} seq {DELETED + 1}-") for line in lines)
    assert lines[-1] == "TAMPERING OR LOSS DETECTED"


async def test_an_altered_and_a_deleted_record_are_both_named(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    database = f"audit_fx_{unique}"
    creds = vault_setup.provision_audit(servers.vault_addr, servers.vault_token)
    authz = with_tls(authz_config(servers.kafka_bootstrap, topics.prefix), pki, "authz")
    cfg = with_tls(
        await audit_config(
            servers.kafka_bootstrap,
            topics.prefix,
            servers.mongodb_uri,
            database,
            vault=VaultAuth(addr=servers.vault_addr, role_id=creds.role_id, secret_id=creds.secret_id),
            checkpoint_interval_s=1,
            authz_target=authz.grpc_bind,
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
    signer = CheckpointSigner(VaultSession(VaultAuth(servers.vault_addr, token=servers.vault_token)))
    keys = await asyncio.to_thread(signer.public_keys)
    store = AuditStore(admin, database)
    records, checkpoints = admin[database][COLLECTION], admin[database][CHECKPOINTS]
    try:
        async with (
            running(lambda stop: run_authz(authz, stop), authz.grpc_bind, pki.tls(TEST_CLIENT)),
            running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
            new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
        ):
            deadline = time.monotonic() + 60
            while True:  # until every event is chained and a signed checkpoint covers them all
                verdict = await store.verify("", keys)
                newest = await checkpoints.find_one(sort=[("seq", -1)])
                if verdict.records >= EVENTS and newest is not None and newest["seq"] >= EVENTS:
                    break
                assert time.monotonic() < deadline, "events never chained and checkpointed"
                await asyncio.sleep(0.3)
            assert verdict.ok
            chain = str(newest["chain"])

            altered = await records.find_one({"chain": chain, "seq": ALTERED})
            assert altered is not None
            await records.update_one({"_id": altered["_id"]}, {"$set": {"event.actor": "someone.else"}})
            assert (await records.delete_one({"chain": chain, "seq": DELETED})).deleted_count == 1

            stub = audit_pb2_grpc.AuditServiceStub(channel)
            rpc = await stub.Verify(audit_pb2.VerifyRequest(subject_id=AUDITOR), timeout=60)
            _assert_both_breaks_named(rpc, chain, str(altered["event_id"]))

            direct = await asyncio.to_thread(_cli, servers, database, topics.prefix)
            _assert_cli_names_both(direct, chain, str(altered["event_id"]))
            as_json = await asyncio.to_thread(_cli, servers, database, topics.prefix, "--json")
            assert as_json.returncode == 1
            parsed = json.loads(as_json.stdout)
            assert [(b["seq"], b["kind"]) for b in parsed["breaks"]] == [
                (ALTERED, "BREAK_KIND_RECORD_ALTERED"),
                (DELETED, "BREAK_KIND_RECORDS_MISSING"),
            ]
            via_service = await asyncio.to_thread(
                _cli,
                servers,
                database,
                topics.prefix,
                "--target",
                cfg.grpc_bind,
                "--subject",
                AUDITOR,
                extra_env=pki.env("ops"),
            )
            _assert_cli_names_both(via_service, chain, str(altered["event_id"]))

            # Someone with database access also removes every stored checkpoint: the published
            # ones still confirm the tail, and both breaks are still named.
            await checkpoints.delete_many({})
            published = await stub.Verify(
                audit_pb2.VerifyRequest(subject_id=AUDITOR, published_checkpoints=True), timeout=60
            )
            _assert_both_breaks_named(published, chain, str(altered["event_id"]))
            from_topic = await asyncio.to_thread(_cli, servers, database, topics.prefix, "--published-checkpoints")
            _assert_cli_names_both(from_topic, chain, str(altered["event_id"]))
    finally:
        await admin.close()
