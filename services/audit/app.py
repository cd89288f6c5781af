"""Wiring of the audit service: `audit.events` consumer, MongoDB store, gRPC Verify/Query."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

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
from dicomsafe.common.vault import VaultSession, VaultUnavailable
from dicomsafe.v1 import audit_pb2_grpc
from services.audit.checkpoints import CheckpointSigner
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
            signer = CheckpointSigner(VaultSession(cfg.vault)) if cfg.vault else None
            if signer is None:
                log.warning("checkpoints disabled: truncation of a chain's tail will not be detectable")
            servicer = AuditServicer(store, signer)
            server, health = new_server(
                [lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, s)],
                [SERVICE_NAME],
                cfg.grpc_bind,
                tls=cfg.tls,
                allow=cfg.grpc_allow,
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
            background = (
                [loop] if signer is None else [loop, checkpoint_forever(store, signer, cfg.checkpoint_interval_s, stop)]
            )
            await run_until_stopped(server, health, [SERVICE_NAME], stop, log, background=background)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await client.close()


async def checkpoint_forever(store: AuditStore, signer: CheckpointSigner, interval_s: int, stop: asyncio.Event) -> None:
    """Sign the head of every chain this replica advanced; once more on the way out."""
    signed: dict[str, int] = {}
    while True:
        stopping = stop.is_set()
        for chain, head in store.heads().items():
            if head.seq > signed.get(chain, 0):
                try:
                    checkpoint = await asyncio.to_thread(signer.sign, chain, head.seq, head.hash)
                    await store.add_checkpoint(checkpoint)
                except (VaultUnavailable, PyMongoError) as exc:
                    log.warning(
                        "checkpoint not written; will retry", extra={"chain": chain, "error": type(exc).__name__}
                    )
                    continue
                signed[chain] = head.seq
        if stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)


def main() -> None:
    cfg = AuditConfig.from_env()
    service_main("audit", lambda stop: run(cfg, stop))
