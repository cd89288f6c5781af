"""Wiring of the authz service: policy file, audit producer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_server, run_until_stopped, service_main
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.v1 import authz_pb2_grpc
from services.authz.config import AuthzConfig
from services.authz.grants import GrantStore
from services.authz.policy import load_policy
from services.authz.service import SERVICE_NAME, AuthzServicer
from services.authz.tokens import TokenVerifier

log = logging.getLogger("dicomsafe.authz")


async def run(cfg: AuthzConfig, stop: asyncio.Event) -> None:
    policy = load_policy(cfg.policy_file)  # a bad policy stops start-up here, loudly
    log.info("policy loaded", extra={"policy_version": policy.version, "roles": len(policy.roles)})
    producer = new_producer(cfg.kafka_bootstrap, "dicomsafe-authz")
    mongo: AsyncMongoClient[dict[str, Any]] | None = None
    grants = None
    if cfg.mongodb_uri:
        mongo = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
        grants = GrantStore(mongo, cfg.mongodb_db)
        await grants.ensure_indexes()
    else:
        log.warning("no AUTHZ_MONGODB_URI: time-limited grants and break-glass are unavailable")
    await producer.start()
    try:
        verifier = None
        if cfg.oidc_issuer:
            jwks_url = cfg.oidc_jwks_url or f"{cfg.oidc_issuer.rstrip('/')}/.well-known/jwks.json"
            verifier = TokenVerifier(cfg.oidc_issuer, cfg.oidc_audience, jwks_url, cfg.oidc_leeway_s, cfg.oidc_mfa_acr)
        else:
            log.warning("no identity provider configured: subjects are trusted as sent (development only)")
        servicer = AuthzServicer(
            policy, AuditEmitter(producer, "authz", Topics(cfg.topic_prefix).audit), verifier, grants
        )
        server, health = new_server(
            [lambda s: authz_pb2_grpc.add_AuthzServiceServicer_to_server(servicer, s)], [SERVICE_NAME], cfg.grpc_bind
        )
        watcher = watch_policy(servicer, cfg.policy_file, cfg.policy_reload_s, stop)
        await run_until_stopped(server, health, [SERVICE_NAME], stop, log, background=[watcher])
    finally:
        await producer.stop()
        if mongo is not None:
            await mongo.close()


async def watch_policy(servicer: AuthzServicer, path: Path, interval_s: int, stop: asyncio.Event) -> None:
    """Reload the policy when the file changes (or on SIGHUP)."""
    reload_now = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_now.set)
    seen = _stamp(path)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(stop, reload_now), timeout=interval_s)
        current = _stamp(path)
        if reload_now.is_set() or current != seen:
            reload_now.clear()
            seen = current
            await servicer.reload(path)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def main() -> None:
    cfg = AuthzConfig.from_env()
    service_main("authz", lambda stop: run(cfg, stop))
