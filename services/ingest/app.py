"""Wiring of the ingest service: Kafka consumer group, crypto client, gRPC Store (STOW-RS path) and health."""

from __future__ import annotations

import asyncio
import logging

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
from dicomsafe.v1 import crypto_pb2_grpc, ingest_pb2_grpc
from services.ingest.config import IngestConfig
from services.ingest.pipeline import IngestPipeline
from services.ingest.sealing import Sealer
from services.ingest.store_service import SERVICE_NAME as STORE_SERVICE
from services.ingest.store_service import StoreServicer

log = logging.getLogger("dicomsafe.ingest")
SERVICE_NAME = "dicomsafe.ingest"


async def run(cfg: IngestConfig, stop: asyncio.Event) -> None:
    topics = Topics(cfg.topic_prefix)
    await require_topics(cfg.kafka_bootstrap, [topics.ingest, dlq_topic(topics.ingest), topics.stored, topics.audit])
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-ingest")
    consumer = new_consumer(cfg.kafka_bootstrap, cfg.group_id, [topics.ingest], "dicomsafe-ingest")
    channel = new_channel(cfg.crypto_target, cfg.tls)
    await producer.start()
    try:
        await consumer.start()
        try:
            pipeline = IngestPipeline(
                Sealer(crypto_pb2_grpc.CryptoServiceStub(channel), cfg.seal_piece_bytes, cfg.seal_deadline_s),
                producer,
                AuditEmitter(producer, "ingest", topics.audit),
                topics,
                cfg.max_instance_bytes,
            )
            store = StoreServicer(pipeline, cfg.store_max_bytes)
            names = [SERVICE_NAME, STORE_SERVICE]
            server, health = new_server(
                [lambda s: ingest_pb2_grpc.add_IngestServiceServicer_to_server(store, s)],
                names,
                cfg.grpc_bind,
                tls=cfg.tls,
                allow=cfg.grpc_allow,
            )
            loop = consume_forever(consumer, pipeline.handle, DeadLetterPublisher(producer, "ingest"), stop, log)
            await run_until_stopped(server, health, names, stop, log, background=[loop])
        finally:
            await consumer.stop()
    finally:
        await channel.close()
        await producer.stop()


def main() -> None:
    cfg = IngestConfig.from_env()
    service_main("ingest", lambda stop: run(cfg, stop))
