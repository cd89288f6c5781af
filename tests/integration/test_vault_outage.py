"""OpenBao stopped in the middle of an ingest: nothing readable or half-written lands on disk,
nothing is dead-lettered, and once OpenBao is back every instance is stored — none lost.

Uses an OpenBao of its own with persistent storage (`tests.restartable`), stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, dlq_topic, ensure_topics, headers_for, new_producer, topic_specs
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc, events_pb2
from services.crypto.app import run as run_crypto
from services.ingest.app import run as run_ingest
from services.ingest.config import IngestConfig
from tests.restartable import PersistentBao
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki
from tools.ports import free_port


async def _stored(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[events_pb2.StoredEvent]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[events_pb2.StoredEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(events_pb2.StoredEvent.FromString(r.value) for r in records)
    finally:
        await consumer.stop()
    return got


async def test_vault_outage_mid_ingest_loses_nothing(
    pki: Pki, servers: Servers, own_bao: PersistentBao, tmp_path: Path, unique: str
) -> None:
    creds = vault_setup.provision(own_bao.addr, own_bao.root_token)
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=2))
    crypto_cfg = with_tls(
        crypto_config(
            servers.kafka_bootstrap, own_bao.addr, creds, tmp_path / "store", topics.prefix, vault_timeout_s=2.0
        ),
        pki,
        "crypto",
    )
    ingest_cfg = with_tls(
        IngestConfig(
            kafka_bootstrap=servers.kafka_bootstrap,
            topic_prefix=topics.prefix,
            group_id=f"ingest-{unique}",
            crypto_target=crypto_cfg.grpc_bind,
            store=crypto_cfg.store,
            grpc_bind=f"127.0.0.1:{free_port()}",
            max_instance_bytes=16 * 1024 * 1024,
            seal_deadline_s=30,
        ),
        pki,
        "ingest",
    )
    instances = [
        dicom_samples.to_bytes(dicom_samples.ct_image(study_uid=None, seed=s, rows=256, columns=256)) for s in range(8)
    ]
    producer = new_producer(servers.kafka_bootstrap, "outage-test")
    await producer.start()

    async def publish(batch: list[bytes]) -> None:
        for data in batch:
            req = events_pb2.IngestRequest(
                request_id=hashlib.sha256(data).hexdigest(), source="t", inline_instance=data
            )
            key = hashlib.sha256(data).hexdigest()[:8].encode()
            await producer.send_and_wait(topics.ingest, req.SerializeToString(), key=key, headers=headers_for(req))

    store = crypto_cfg.store_dir
    try:
        async with (
            running(lambda stop: run_crypto(crypto_cfg, stop), crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
            running(lambda stop: run_ingest(ingest_cfg, stop), ingest_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        ):
            await publish(instances[:3])
            assert len(await _stored(servers.kafka_bootstrap, topics.stored, 3, 60)) == 3

            own_bao.stop()  # OpenBao down mid-ingest
            await publish(instances[3:])
            await asyncio.sleep(6)  # several seal attempts fail while it is down
            during = await _stored(servers.kafka_bootstrap, topics.stored, 100, 2)
            assert len(during) == 3, "nothing can be stored without Vault"
            sealed_files = list(store.rglob("*.dso"))
            assert len(sealed_files) == 3
            assert not list(store.rglob("*.tmp")), "no half-written object is left behind"
            for path in store.rglob("*"):
                if path.is_file():
                    raw = path.read_bytes()
                    assert b"DICM" not in raw and dicom_samples.SYNTHETIC_MARKER not in raw

            own_bao.start()  # back, unsealed with the same storage: same keys
            stored = await _stored(servers.kafka_bootstrap, topics.stored, len(instances), 120)
            assert {e.plaintext_sha256 for e in stored} == {hashlib.sha256(d).hexdigest() for d in instances}

            dead = await _stored(servers.kafka_bootstrap, dlq_topic(topics.ingest), 1, 3)
            assert dead == [], "an outage must never dead-letter input"

            async with new_channel(crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel:
                stub = crypto_pb2_grpc.CryptoServiceStub(channel)
                for event in stored:
                    parts = [p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=event.object_id))]
                    assert hashlib.sha256(b"".join(parts)).hexdigest() == event.plaintext_sha256
    finally:
        await producer.stop()
    assert len(list(store.rglob("*.dso"))) == len(instances)
