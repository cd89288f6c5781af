"""Outages in the middle of an ingest of 2,000 instances, every service its own process:
OpenBao stopped for 20 s, the MongoDB-wire server stopped for 20 s, Kafka restarted, the audit
service killed with SIGKILL, ingest (which seals and stores) killed with SIGKILL. Afterwards,
with nobody stepping in (the killed service is started again, as Kubernetes restarts a pod; no
other service is touched):

- every instance published is stored, sealed and indexed: 0 lost, nothing dead-lettered;
- exactly one sealed object per instance: 0 duplicates, however often a message was redelivered;
- no plaintext on disk: no object store file holds DICOM or the patient's name, nor does a log;
- the audit trail verifies (hash chain and signed checkpoints), one stored record per instance;
- what was stored opens to the bytes sent, through the gateway, for an authorised user.

The server taken down is one of the test's own (`tests.restartable`), on persistent storage,
so that it comes back with its data; the others are the shared ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, dlq_topic, ensure_topics, topic_specs
from dicomsafe.storage.store_fs import FileStore
from dicomsafe.v1 import events_pb2, retrieval_pb2, retrieval_pb2_grpc
from services.audit.store import COLLECTION
from tests.audit_trail import verify_directly
from tests.own_site import publish
from tests.restartable import OwnKafka, OwnMongo, PersistentBao
from tests.servers import Servers
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack, StackSettings, free_base_port

INSTANCES = 2000
STUDIES = 40
OUTAGE_S = 20.0
# The outage starts once this many objects are sealed: well inside the ingest.
OUTAGE_AT = INSTANCES // 5
SETTLE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Servers3:
    kafka_bootstrap: str
    vault_addr: str
    vault_token: str
    mongodb_uri: str


@dataclass(frozen=True)
class Sent:
    by_sop: dict[str, bytes]
    marker: str  # the patients' name: must never reach the disk or a log

    @property
    def sha256(self) -> dict[str, str]:
        return {sop: hashlib.sha256(data).hexdigest() for sop, data in self.by_sop.items()}


def _instances(marker: str) -> Sent:
    """Small CT and MR instances (the outage is the point, not the size), 50 per study."""
    by_sop: dict[str, bytes] = {}
    studies = [f"2.25.{uuid.uuid4().int}" for _ in range(STUDIES)]
    for i in range(INSTANCES):
        study = studies[i % STUDIES]
        if i % 4 == 3:
            ds = dicom_samples.mr_image(study_uid=study, seed=i, rows=64, columns=64)
        else:
            ds = dicom_samples.ct_image(study_uid=study, seed=i, rows=64, columns=64)
        ds.PatientName = marker
        by_sop[str(ds.SOPInstanceUID)] = dicom_samples.to_bytes(ds)
    return Sent(by_sop, marker)


def _sealed_objects(stack: Stack) -> list[Path]:
    return list((stack.settings.work_dir / "store").rglob("*.dso"))


async def _until_sealed(stack: Stack, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_sealed_objects(stack)) < count:
        assert time.monotonic() < deadline, f"only {len(_sealed_objects(stack))} of {count} objects sealed"
        assert all(p.poll() is None for p in stack.processes.values()), "a service exited"
        await asyncio.sleep(0.5)


async def _indexed(mongodb_uri: str, index_db: str) -> dict[str, str] | None:
    """SOP Instance UID -> object id of every indexed instance; None while MongoDB is down."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        return {
            str(d["_id"]): str(d["object_id"]) async for d in client[index_db]["instances"].find({}, {"object_id": 1})
        }
    except PyMongoError:
        return None
    finally:
        await client.close()


async def _stored_audited(mongodb_uri: str, audit_db: str) -> set[str] | None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        found = await client[audit_db][COLLECTION].distinct(
            "event.sop_instance_uid", {"event.action": "AUDIT_ACTION_INSTANCE_STORED"}
        )
        return {str(uid) for uid in found}
    except PyMongoError:
        return None
    finally:
        await client.close()


async def _topic_records(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[bytes]:
    """Everything on ``topic`` now (read until nothing more comes for ``idle_s``)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[bytes] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                got.extend(r.value or b"" for r in records)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return got


async def _retrieve(stack: Stack, token: str, object_id: str) -> bytes:
    async with new_channel(stack.settings.target("gateway"), stack.settings.client_tls("viewer")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        request = retrieval_pb2.RetrieveRequest(access_token=token, object_id=object_id, purpose="treatment")
        return b"".join([p.data async for p in stub.Retrieve(request, timeout=60)])


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {needle!r}" for needle in needles if needle in data]
    return hits


Outage = Callable[[Stack], Awaitable[None]]


async def _ingest_through(
    outage: Outage, servers: Servers3, idp: LocalIssuer, work: Path, *, restart_after: tuple[str, ...] = ()
) -> None:
    unique = uuid.uuid4().hex[:8]
    topics = Topics(f"out{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=3))
    settings = StackSettings(
        kafka_bootstrap=servers.kafka_bootstrap,
        vault_addr=servers.vault_addr,
        vault_admin_token=servers.vault_token,
        mongodb_uri=servers.mongodb_uri,
        work_dir=work / "stack",
        topic_prefix=topics.prefix,
        base_port=free_base_port(),
        audit_db=f"out_audit_{unique}",
        authz_db=f"out_authz_{unique}",
        index_db=f"out_index_{unique}",
        oidc_issuer=idp.url,
        oidc_jwks_url=idp.jwks_url,
    )
    sent = _instances(f"OUTAGE^{unique.upper()}")
    stack = Stack(settings)
    try:
        await asyncio.to_thread(stack.start)
        await publish(settings, sent.by_sop.values(), source="outage-modality")
        await _until_sealed(stack, OUTAGE_AT, 300)
        await outage(stack)
        for name in restart_after:
            await asyncio.to_thread(stack.start, (name,))

        # Nobody steps in from here: the pipeline must finish by itself.
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        progress: list[tuple[int, int, int]] = []  # (s after the outage, indexed, audited)
        while True:
            n_indexed = len(await _indexed(settings.mongodb_uri, settings.index_db) or {})
            n_audited = len(await _stored_audited(settings.mongodb_uri, settings.audit_db) or set())
            progress.append((round(time.monotonic() - deadline + SETTLE_TIMEOUT_S), n_indexed, n_audited))
            if n_indexed >= INSTANCES and n_audited >= INSTANCES:
                break
            assert time.monotonic() < deadline, f"after the outage: {n_indexed} indexed, {n_audited} audited"
            assert all(p.poll() is None for p in stack.processes.values()), "a service exited"
            await asyncio.sleep(1)
        print(f"recovery: {progress[::5]} -> {progress[-1]}")
        await asyncio.sleep(3)  # a late duplicate would show up now

        # 0 lost, 0 duplicates: one object per instance, each the one the index names.
        indexed = await _indexed(settings.mongodb_uri, settings.index_db)
        assert indexed is not None and set(indexed) == set(sent.by_sop)
        objects = {p.stem for p in _sealed_objects(stack)}
        assert len(_sealed_objects(stack)) == INSTANCES
        assert objects == set(indexed.values())
        stored = [
            events_pb2.StoredEvent.FromString(v) for v in await _topic_records(settings.kafka_bootstrap, topics.stored)
        ]
        assert {e.sop_instance_uid: e.plaintext_sha256 for e in stored} == sent.sha256
        assert {e.object_id for e in stored} == objects
        dead = await _topic_records(settings.kafka_bootstrap, dlq_topic(topics.ingest), idle_s=1.0)
        assert dead == [], [events_pb2.DeadLetter.FromString(d).reason_code for d in dead]

        # No plaintext on disk: no DICOM file signature (preamble + "DICM"; "DICM" alone occurs
        # in base64 of wrapped keys) and no patient name anywhere the stack keeps files, logs
        # included; no stretch of an object's own instance in it.
        assert _files_holding(settings.work_dir, [bytes(128) + b"DICM", sent.marker.encode()]) == []
        sop_of = {object_id: sop for sop, object_id in indexed.items()}
        for path in _sealed_objects(stack):
            sealed, original = path.read_bytes(), sent.by_sop[sop_of[path.stem]]
            assert original[132:388] not in sealed and original[-256:] not in sealed, path.name

        # The trail: continuous, verified, one stored record per instance.
        audited = await _stored_audited(settings.mongodb_uri, settings.audit_db)
        assert audited == set(sent.by_sop)
        verdict = await verify_directly(settings.mongodb_uri, settings.audit_db)
        assert verdict.ok, list(verdict.breaks)

        # What was stored opens to what was sent.
        token = idp.token("dr.house")
        for sop in random.Random(unique).sample(sorted(sent.by_sop), 12):
            assert await _retrieve(stack, token, indexed[sop]) == sent.by_sop[sop]
        assert all(p.poll() is None for p in stack.processes.values())
    finally:
        codes = await asyncio.to_thread(stack.stop)
    assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"


@pytest.fixture
def shared(servers: Servers) -> Servers3:
    return Servers3(servers.kafka_bootstrap, servers.vault_addr, servers.vault_token, servers.mongodb_uri)


async def test_openbao_down_for_20s_mid_ingest(
    shared: Servers3, own_bao: PersistentBao, idp: LocalIssuer, tmp_path: Path
) -> None:
    async def outage(stack: Stack) -> None:
        await asyncio.to_thread(own_bao.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(own_bao.start)  # unsealed again, as an operator would

    servers = Servers3(shared.kafka_bootstrap, own_bao.addr, own_bao.root_token, shared.mongodb_uri)
    await _ingest_through(outage, servers, idp, tmp_path)


async def test_mongodb_down_for_20s_mid_ingest(
    shared: Servers3, own_mongo: OwnMongo, idp: LocalIssuer, tmp_path: Path
) -> None:
    async def outage(stack: Stack) -> None:
        await asyncio.to_thread(own_mongo.stop)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(own_mongo.start)

    servers = Servers3(shared.kafka_bootstrap, shared.vault_addr, shared.vault_token, own_mongo.uri)
    await _ingest_through(outage, servers, idp, tmp_path)


async def test_kafka_restarted_mid_ingest(
    shared: Servers3, own_kafka: OwnKafka, idp: LocalIssuer, tmp_path: Path
) -> None:
    async def outage(stack: Stack) -> None:
        await asyncio.to_thread(own_kafka.stop)
        await asyncio.to_thread(own_kafka.start)

    servers = Servers3(own_kafka.bootstrap, shared.vault_addr, shared.vault_token, shared.mongodb_uri)
    await _ingest_through(outage, servers, idp, tmp_path)


async def test_audit_killed_mid_ingest(shared: Servers3, idp: LocalIssuer, tmp_path: Path) -> None:
    async def outage(stack: Stack) -> None:
        audit = stack.processes.pop("audit")
        os.killpg(audit.pid, signal.SIGKILL)  # no chance to flush or commit anything
        await asyncio.to_thread(audit.wait, 30)

    await _ingest_through(outage, shared, idp, tmp_path, restart_after=("audit",))


async def test_ingest_killed_mid_ingest(shared: Servers3, idp: LocalIssuer, tmp_path: Path) -> None:
    """ingest seals and puts the objects itself (#15): killed mid-put, every record it had not
    committed is redelivered and stored once, and a put it left half-written never became an
    object (only a temp file, dropped by the store's leftover clean-up)."""

    async def outage(stack: Stack) -> None:
        ingest = stack.processes.pop("ingest")
        os.killpg(ingest.pid, signal.SIGKILL)  # mid-seal: no chance to abort a put or commit an offset
        await asyncio.to_thread(ingest.wait, 30)

    await _ingest_through(outage, shared, idp, tmp_path, restart_after=("ingest",))
    store = FileStore(tmp_path / "stack" / "store", leftover_age_s=0)
    store.remove_leftovers()
    assert store.leftover_temp_files() == []
    assert len(list(store.object_ids())) == INSTANCES
