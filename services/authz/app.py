"""Wiring of the authz service: policy file, audit producer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from grpc_health.v1 import health
from pymongo import AsyncMongoClient

from dicomsafe.common.alert_emitter import AlertEmitter
from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_server, run_until_stopped, service_main, set_serving
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.v1 import authz_pb2_grpc
from services.authz.config import AuthzConfig
from services.authz.grant_cache import GrantCache
from services.authz.grants import GrantStore
from services.authz.policy import load_policy
from services.authz.service import SERVICE_NAME, AuthzServicer
from services.authz.tokens import TokenVerifier
from services.authz.trail import AuditUnavailable, Trail

log = logging.getLogger("dicomsafe.authz")


class AuditLink:
    """The Kafka producer behind the audit trail and the security alerts.

    Without it every call fails closed (``UNAVAILABLE``) and readiness is NOT_SERVING, while
    the link keeps reconnecting with backoff; a Kafka outage at start-up therefore delays
    service, it does not crash-loop the pod or ever yield an unaudited answer.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        trail: Trail,
        attempt_timeout_s: float = 10.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._trail = trail
        self._attempt_timeout_s = attempt_timeout_s
        self._max_backoff_s = max_backoff_s
        self._producer: AIOKafkaProducer | None = None

    @property
    def connected(self) -> bool:
        return self._producer is not None

    async def connect_once(self) -> bool:
        producer = new_producer(self._bootstrap, "dicomsafe-authz")
        try:
            await asyncio.wait_for(producer.start(), timeout=self._attempt_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:  # cannot bootstrap: no audit trail yet
            log.error("audit producer cannot connect; answering UNAVAILABLE", extra={"error": type(exc).__name__})
            await producer.stop()
            return False
        self._producer = producer
        self._trail.connect(
            AuditEmitter(producer, "authz", self._topics.audit), AlertEmitter(producer, "authz", self._topics.alerts)
        )
        return True

    async def keep(self, health_servicer: health.aio.HealthServicer, stop: asyncio.Event) -> None:
        """Background task for ``run_until_stopped``: connect if needed, then wait for stop."""
        if not self.connected:
            await set_serving(health_servicer, [SERVICE_NAME], False)
            backoff = 1.0
            while not stop.is_set() and not await self.connect_once():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            if stop.is_set():
                return
            log.info("audit producer connected")
            await set_serving(health_servicer, [SERVICE_NAME], True)
        await stop.wait()

    async def close(self) -> None:
        self._trail.connect(None, None)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def run(cfg: AuthzConfig, stop: asyncio.Event) -> None:
    policy = load_policy(cfg.policy_file)  # a bad policy stops start-up here, loudly
    log.info("policy loaded", extra={"policy_version": policy.version, "roles": len(policy.roles)})
    mongo: AsyncMongoClient[dict[str, Any]] | None = None
    grants = None
    cache = None
    if cfg.mongodb_uri:
        mongo = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
        grants = GrantStore(mongo, cfg.mongodb_db)
        await grants.ensure_indexes()
        cache = GrantCache(grants, cfg.grant_cache_poll_ms / 1000)
    else:
        log.warning("no AUTHZ_MONGODB_URI: time-limited grants and break-glass are unavailable")
    verifier = None
    if cfg.oidc_issuer:
        jwks_url = cfg.oidc_jwks_url or f"{cfg.oidc_issuer.rstrip('/')}/.well-known/jwks.json"
        verifier = TokenVerifier(
            cfg.oidc_issuer, cfg.oidc_audience, jwks_url, cfg.oidc_leeway_s, cfg.oidc_mfa_acr, cfg.oidc_remember_s
        )
    else:
        log.warning("no identity provider configured: subjects are trusted as sent (development only)")
    trail = Trail(cfg.audit_timeout_s)
    servicer = AuthzServicer(
        policy, trail, verifier, grants, cache if cache and cache.enabled else None, cfg.dimse_vouchers
    )
    link = AuditLink(cfg.kafka_bootstrap, Topics(cfg.topic_prefix), trail)
    try:
        # First attempt before serving, so a healthy start never reports SERVING without an audit trail.
        await link.connect_once()
        server, health_servicer = new_server(
            [lambda s: authz_pb2_grpc.add_AuthzServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            cfg.grpc_bind,
            tls=cfg.tls,
            allow=cfg.grpc_allow,
        )
        background = [
            watch_policy(servicer, cfg.policy_file, cfg.policy_reload_s, stop),
            link.keep(health_servicer, stop),
        ]
        if servicer.announcer is not None:
            background.append(servicer.announcer.keep(cfg.break_glass_sweep_s, stop))
        if cache is not None and cache.enabled:
            background.append(cache.keep(stop))
        await run_until_stopped(server, health_servicer, [SERVICE_NAME], stop, log, background=background)
    finally:
        await link.close()
        if mongo is not None:
            await mongo.close()


async def watch_policy(servicer: AuthzServicer, path: Path, interval_s: int, stop: asyncio.Event) -> None:
    """Reload the policy when the file changes (or on SIGHUP).

    A change that cannot be audited is not applied and is retried at the next interval.
    """
    reload_now = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_now.set)
    seen = _stamp(path)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(stop, reload_now), timeout=interval_s)
        if stop.is_set():
            break
        current = _stamp(path)
        if reload_now.is_set() or current != seen:
            try:
                await servicer.reload(path)
            except AuditUnavailable:
                log.error("policy change not audited; keeping the current policy and retrying")
                continue
            reload_now.clear()
            seen = current


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
