"""Wiring of the ingest service: Kafka consumer group, crypto key client, object store, health."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel, new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import (
    DeadLetterPublisher,
    Topics,
    consume_forever,
    dlq_topic,
    new_consumer,
    new_producer,
    require_topics,
)
from dicomsafe.storage.instance_storer import InstanceStorer
from dicomsafe.storage.object_store import open_store
from dicomsafe.storage.sealer import Sealer
from dicomsafe.v1 import crypto_pb2_grpc
from services.ingest.config import IngestConfig
from services.ingest.dimse_listener import DimseListener
from services.ingest.pipeline import IngestPipeline

log = logging.getLogger("dicomsafe.ingest")
SERVICE_NAME = "dicomsafe.ingest"


async def run(cfg: IngestConfig, stop: asyncio.Event) -> None:
    topics = Topics(cfg.topic_prefix)
    await require_topics(cfg.kafka_bootstrap, [topics.ingest, dlq_topic(topics.ingest), topics.stored, topics.audit])
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-ingest")
    consumer = new_consumer(cfg.kafka_bootstrap, cfg.group_id, [topics.ingest], "dicomsafe-ingest")
    store = await asyncio.to_thread(open_store, cfg.store)
    channel = new_channel(cfg.crypto_target, cfg.tls)
    # Two threads: one seal's AES-GCM runs while another's hashing and writes release the GIL.
    seal_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seal")
    await producer.start()
    try:
        await consumer.start()
        try:
            sealer = Sealer(
                crypto_pb2_grpc.CryptoServiceStub(channel), store, cfg.seal_deadline_s, seal_threads, "ingest"
            )
            audit = AuditEmitter(producer, "ingest", topics.audit)
            storer = InstanceStorer(sealer, producer, audit, topics, cfg.max_instance_bytes)
            pipeline = IngestPipeline(storer)
            dimse = None
            if cfg.dimse is not None:
                dimse = DimseListener(cfg.dimse, cfg.tls, storer, audit)
                await dimse.start()
            try:
                names = [SERVICE_NAME]
                server, health = new_server([], names, cfg.grpc_bind, tls=cfg.tls, allow=cfg.grpc_allow)
                loop = consume_forever(consumer, pipeline.handle, DeadLetterPublisher(producer, "ingest"), stop, log)
                await run_until_stopped(server, health, names, stop, log, background=[loop])
            finally:
                # Before the producer stops: C-STOREs in progress still need it to finish.
                if dimse is not None:
                    await dimse.stop()
        finally:
            await consumer.stop()
    finally:
        await channel.close()
        await producer.stop()
        seal_threads.shutdown(wait=True)


def main() -> None:
    cfg = IngestConfig.from_env()
    service_main("ingest", lambda stop: run(cfg, stop))
