"""Wiring of the crypto service: Vault Transit keys, object store, audit producer, gRPC server."""

from __future__ import annotations

import asyncio
import logging

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.storage.object_store import ObjectStore, open_store
from dicomsafe.storage.store_tiered import TieredStore
from dicomsafe.v1 import crypto_pb2_grpc
from services.crypto.config import CryptoConfig
from services.crypto.service import SERVICE_NAME, CryptoServicer
from services.crypto.vault_keys import TransitKeys

log = logging.getLogger("dicomsafe.crypto")


async def run(cfg: CryptoConfig, stop: asyncio.Event) -> None:
    store: ObjectStore = await asyncio.to_thread(open_store, cfg.store)
    if cfg.archive is not None:
        store = TieredStore(store, await asyncio.to_thread(open_store, cfg.archive))
    # Seals interrupted by a crash: never committed, never acknowledged, safe to drop.
    removed = await asyncio.to_thread(store.remove_leftovers)
    log.info("object store ready", extra={"store": store.describe_location(), "leftovers_removed": removed})
    keys = TransitKeys(cfg.vault)
    # Expired data and erasure keys are zeroed on a timer, not only when the next read happens
    # to come, and every cached key is zeroed when the service stops.
    sweeper_stop = asyncio.Event()
    sweeper = asyncio.create_task(keys.sweep_caches_until(sweeper_stop))
    try:
        await _serve(cfg, store, keys, stop)
    finally:
        sweeper_stop.set()
        await sweeper


async def _serve(cfg: CryptoConfig, store: ObjectStore, keys: TransitKeys, stop: asyncio.Event) -> None:
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-crypto")
    await producer.start()
    try:
        audit = AuditEmitter(producer, "crypto", Topics(cfg.topic_prefix).audit)
        servicer = CryptoServicer(store, keys, audit, cfg.chunk_size, cfg.max_object_bytes)
        server, health = new_server(
            [lambda s: crypto_pb2_grpc.add_CryptoServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            cfg.grpc_bind,
            tls=cfg.tls,
            allow=cfg.grpc_allow,
        )
        await run_until_stopped(server, health, [SERVICE_NAME], stop, log)
    finally:
        await producer.stop()


def main() -> None:
    cfg = CryptoConfig.from_env()
    service_main("crypto", lambda stop: run(cfg, stop))
