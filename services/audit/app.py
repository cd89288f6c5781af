"""Wiring of the audit service: `audit.events` consumer, MongoDB store, gRPC Verify/Query."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import (
    DeadLetterPublisher,
    Topics,
    consume_forever,
    dlq_topic,
    new_consumer,
    new_producer,
    require_topics,
)
from dicomsafe.v1 import audit_pb2_grpc
from services.audit.config import AuditConfig
from services.audit.consumer import AuditConsumer
from services.audit.service import SERVICE_NAME, AuditServicer
from services.audit.store import AuditStore

log = logging.getLogger("dicomsafe.audit")


async def run(cfg: AuditConfig, stop: asyncio.Event) -> None:
    topics = Topics(cfg.topic_prefix)
    await require_topics(cfg.kafka_bootstrap, [topics.audit, dlq_topic(topics.audit)])
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    store = AuditStore(client, cfg.database)
    await store.check_indexes()
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-audit")
    consumer = new_consumer(cfg.kafka_bootstrap, cfg.group_id, [topics.audit], "dicomsafe-audit")
    await producer.start()
    try:
        await consumer.start()
        try:
            servicer = AuditServicer(store)
            server, health = new_server(
                [lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, s)],
                [SERVICE_NAME],
                cfg.grpc_bind,
            )
            handler = AuditConsumer(store)
            loop = consume_forever(
                consumer,
                handler.handle,
                DeadLetterPublisher(producer, "audit"),
                stop,
                log,
                handle_batch=handler.handle_batch,
                max_records=500,
            )
            await run_until_stopped(server, health, [SERVICE_NAME], stop, log, background=[loop])
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await client.close()


def main() -> None:
    cfg = AuditConfig.from_env()
    service_main("audit", lambda stop: run(cfg, stop))
