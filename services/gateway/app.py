"""Wiring of the gateway: gRPC Retrieve, DICOMweb over HTTPS, and the study indexer (which also
drops erased patients' entries)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiokafka import ConsumerRecord
from pymongo import AsyncMongoClient

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel, new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import (
    DeadLetterPublisher,
    Handler,
    Topics,
    consume_forever,
    dlq_topic,
    new_consumer,
    new_producer,
    require_topics,
)
from dicomsafe.common.tls import tls13_server_context
from dicomsafe.storage.instance_storer import InstanceStorer
from dicomsafe.storage.object_store import open_store
from dicomsafe.storage.sealer import Sealer
from dicomsafe.v1 import authz_pb2_grpc, crypto_pb2_grpc, retrieval_pb2_grpc
from services.gateway.access import AccessChecker
from services.gateway.config import GatewayConfig
from services.gateway.deidentify import Deidentifier
from services.gateway.dicomweb_app import create_app
from services.gateway.dicomweb_common import Backends
from services.gateway.dimse_qr import QueryRetrieveListener
from services.gateway.erasure import IndexEraser
from services.gateway.https import serve_https
from services.gateway.indexer import Indexer
from services.gateway.service import SERVICE_NAME, RetrievalServicer
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway")
DICOMWEB_ROOT = "/dicomweb"


async def run(cfg: GatewayConfig, stop: asyncio.Event) -> None:
    topics = Topics(cfg.topic_prefix)
    consumed = [topics.stored, topics.erased]
    await require_topics(cfg.kafka_bootstrap, [*consumed, *map(dlq_topic, consumed), topics.audit])
    https_context = tls13_server_context(cfg.tls_cert_file, cfg.tls_key_file)
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-gateway")
    consumer = new_consumer(cfg.kafka_bootstrap, cfg.index_group_id, consumed, "dicomsafe-gateway-index")
    authz_channel = new_channel(cfg.authz_target, cfg.tls)
    crypto_channel = new_channel(cfg.crypto_target, cfg.tls)
    store = await asyncio.to_thread(open_store, cfg.store)
    # Two threads: one part's AES-GCM runs while another's hashing and writes release the GIL.
    seal_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="seal")
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    deidentifier = Deidentifier(cfg.deid_uid_key)
    index = StudyIndex(mongo, cfg.index_database, deidentifier)
    await producer.start()
    try:
        await consumer.start()
        try:
            audit = AuditEmitter(producer, "gateway", topics.audit)
            crypto = crypto_pb2_grpc.CryptoServiceStub(crypto_channel)
            authz = authz_pb2_grpc.AuthzServiceStub(authz_channel)
            await index.ensure_indexes()
            if backfilled := await index.backfill_pseudonyms():
                log.info("pseudonymous UIDs added to index entries", extra={"count": backfilled})
            backends = Backends(
                access=AccessChecker(authz, cfg.call_deadline_s),
                crypto=crypto,
                storer=InstanceStorer(
                    Sealer(crypto, store, cfg.call_deadline_s, seal_threads, "gateway"),
                    producer,
                    audit,
                    topics,
                    cfg.max_instance_bytes,
                ),
                index=index,
                audit=audit,
                deidentifier=deidentifier,
                max_instance_bytes=cfg.max_instance_bytes,
                deadline_s=cfg.call_deadline_s,
                root=DICOMWEB_ROOT,
                public_url=cfg.public_url,
                verify_before_send_bytes=cfg.verify_before_send_bytes,
            )
            servicer = RetrievalServicer(authz, crypto, audit, cfg.call_deadline_s, index)
            server, health = new_server(
                [lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
                [SERVICE_NAME],
                cfg.grpc_bind,
                tls=cfg.tls,
                allow=cfg.grpc_allow,
            )
            indexer = Indexer(crypto, index, cfg.call_deadline_s, cfg.index_grace_s, cfg.index_read_concurrency)
            handlers: dict[str, Handler] = {topics.stored: indexer.handle, topics.erased: IndexEraser(index).handle}

            async def index_record(record: ConsumerRecord[bytes, bytes]) -> None:
                await handlers[record.topic](record)

            async def index_batch(records: list[ConsumerRecord[bytes, bytes]]) -> None:
                # A batch is one partition's, so of one topic. Erasures are few: one at a time.
                if records[0].topic == topics.stored:
                    await indexer.handle_batch(records)
                else:
                    for record in records:
                        await index_record(record)

            indexing = consume_forever(
                consumer,
                index_record,
                DeadLetterPublisher(producer, "gateway"),
                stop,
                log,
                handle_batch=index_batch,
            )
            https = serve_https(create_app(backends, cfg.cors_origins), cfg.http_bind, https_context, stop)
            dimse = None
            if cfg.dimse is not None:
                dimse = QueryRetrieveListener(cfg.dimse, cfg.tls, backends)
                await dimse.start()
            try:
                await run_until_stopped(server, health, [SERVICE_NAME], stop, log, background=[indexing, https])
            finally:
                if dimse is not None:
                    await dimse.stop()
        finally:
            await consumer.stop()
            await index.drain_access_writes()
    finally:
        await mongo.close()
        for channel in (authz_channel, crypto_channel):
            await channel.close()
        await producer.stop()
        seal_threads.shutdown(wait=True)


def main() -> None:
    cfg = GatewayConfig.from_env()
    service_main("gateway", lambda stop: run(cfg, stop))
