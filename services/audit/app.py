"""Wiring of the audit service: `audit.events` consumer, MongoDB store, gRPC Verify/Query."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from dicomsafe.common.alert_emitter import AlertEmitter
from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.config import ConfigError, host_port
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
from dicomsafe.common.vault import VaultSession, VaultUnavailable
from dicomsafe.v1 import audit_pb2_grpc, authz_pb2_grpc
from services.audit.access import AuditAccess
from services.audit.alerts import SOURCE, AlertRaiser, alert_forever
from services.audit.checkpoint_topic import publish
from services.audit.checkpoints import CheckpointSigner
from services.audit.config import AuditConfig
from services.audit.consumer import AuditConsumer
from services.audit.patterns import Rules
from services.audit.service import SERVICE_NAME, AuditServicer, PublishedSource
from services.audit.store import AuditStore
from services.audit.syslog_forward import SyslogForwarder, SyslogTarget, forward_forever

log = logging.getLogger("dicomsafe.audit")


async def run(cfg: AuditConfig, stop: asyncio.Event) -> None:
    topics = Topics(cfg.topic_prefix)
    required = [topics.audit, dlq_topic(topics.audit)] + ([topics.alerts] if cfg.alert_interval_s > 0 else [])
    if cfg.vault:  # checkpoints are signed: they are published too
        required.append(topics.checkpoints)
    await require_topics(cfg.kafka_bootstrap, required)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    store = AuditStore(client, cfg.database)
    await store.check_indexes()
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-audit")
    consumer = new_consumer(cfg.kafka_bootstrap, cfg.group_id, [topics.audit], "dicomsafe-audit")
    authz_channel = new_channel(cfg.authz_target, cfg.tls)
    await producer.start()
    try:
        await consumer.start()
        try:
            signer = CheckpointSigner(VaultSession(cfg.vault)) if cfg.vault else None
            if signer is None:
                log.warning("checkpoints disabled: truncation of a chain's tail will not be detectable")
            access = AuditAccess(
                authz_pb2_grpc.AuthzServiceStub(authz_channel),
                AuditEmitter(producer, "audit", topics.audit),
                cfg.authz_deadline_s,
            )
            servicer = AuditServicer(store, signer, access, PublishedSource(cfg.kafka_bootstrap, topics.checkpoints))
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
            background: list[Awaitable[None]] = [loop]
            if signer is not None:
                background.append(
                    checkpoint_forever(store, signer, cfg.checkpoint_interval_s, stop, producer, topics.checkpoints)
                )
            if cfg.alert_interval_s > 0:
                raiser = AlertRaiser(
                    store,
                    AlertEmitter(producer, SOURCE, topics.alerts),
                    Rules(timezone=cfg.alert_timezone),
                    dt.timedelta(seconds=cfg.alert_window_s),
                )
                background.append(alert_forever(raiser, cfg.alert_interval_s, stop))
            else:
                log.warning("pattern alerts disabled (AUDIT_ALERT_INTERVAL_S=0)")
            if cfg.syslog_target:
                forwarder = SyslogForwarder(store, syslog_target(cfg))
                background.append(forward_forever(forwarder, cfg.syslog_interval_s, stop))
            await run_until_stopped(server, health, [SERVICE_NAME], stop, log, background=background)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
        await authz_channel.close()
        await client.close()


async def checkpoint_forever(
    store: AuditStore,
    signer: CheckpointSigner,
    interval_s: int,
    stop: asyncio.Event,
    producer: AIOKafkaProducer | None = None,
    topic: str = "",
) -> None:
    """Sign the head of every chain this replica advanced, store it and publish it on ``topic``
    (outside the database); once more on the way out. A head counts as signed only when both
    copies are acknowledged; a retry stores nothing twice (unique (chain, seq)), and a verifier
    takes the newest published checkpoint per chain, so a republished one is harmless."""
    signed: dict[str, int] = {}
    while True:
        stopping = stop.is_set()
        for chain, head in store.heads().items():
            if head.seq > signed.get(chain, 0):
                try:
                    checkpoint = await asyncio.to_thread(signer.sign, chain, head.seq, head.hash)
                    await store.add_checkpoint(checkpoint)
                    if producer is not None:
                        await publish(producer, topic, checkpoint)
                except (VaultUnavailable, PyMongoError, KafkaError) as exc:
                    log.warning(
                        "checkpoint not written; will retry", extra={"chain": chain, "error": type(exc).__name__}
                    )
                    continue
                signed[chain] = head.seq
        if stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)


def syslog_target(cfg: AuditConfig) -> SyslogTarget:
    try:
        host, port = host_port(cfg.syslog_target)
    except ConfigError:
        host, port = "", 0
    if not host or not cfg.syslog_ca_file:
        raise ValueError("AUDIT_SYSLOG_TARGET must be host:port, with AUDIT_SYSLOG_CA_FILE")
    return SyslogTarget(host, port, cfg.syslog_ca_file, cfg.syslog_hostname)


def main() -> None:
    cfg = AuditConfig.from_env()
    service_main("audit", lambda stop: run(cfg, stop))
