"""Wiring of the gateway: authz and crypto clients, audit producer, gRPC server."""

from __future__ import annotations

import asyncio
import logging

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel, new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.v1 import authz_pb2_grpc, crypto_pb2_grpc, retrieval_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.service import SERVICE_NAME, RetrievalServicer

log = logging.getLogger("dicomsafe.gateway")


async def run(cfg: GatewayConfig, stop: asyncio.Event) -> None:
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-gateway")
    authz_channel = new_channel(cfg.authz_target, cfg.tls)
    crypto_channel = new_channel(cfg.crypto_target, cfg.tls)
    await producer.start()
    try:
        servicer = RetrievalServicer(
            authz_pb2_grpc.AuthzServiceStub(authz_channel),
            crypto_pb2_grpc.CryptoServiceStub(crypto_channel),
            AuditEmitter(producer, "gateway", Topics(cfg.topic_prefix).audit),
            cfg.call_deadline_s,
        )
        server, health = new_server(
            [lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            cfg.grpc_bind,
            tls=cfg.tls,
            allow=cfg.grpc_allow,
        )
        await run_until_stopped(server, health, [SERVICE_NAME], stop, log)
    finally:
        await authz_channel.close()
        await crypto_channel.close()
        await producer.stop()


def main() -> None:
    cfg = GatewayConfig.from_env()
    service_main("gateway", lambda stop: run(cfg, stop))
