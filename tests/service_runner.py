"""Running one service in-process for integration tests, against the real servers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.mongo_users import user_uri
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig
from dicomsafe.storage.object_store import S3Settings, StoreSettings, file_url, open_store
from dicomsafe.storage.sealer import Sealer
from dicomsafe.v1 import authz_pb2_grpc, crypto_pb2_grpc
from services.audit.config import AuditConfig
from services.audit.provision import provision as provision_audit
from services.authz.app import run as run_authz
from services.authz.config import AuthzConfig
from services.crypto.config import CryptoConfig
from services.crypto.vault_keys import VaultSettings
from tests.servers import S3Endpoint
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki
from tools.ports import free_port
from tools.stack import POLICY_FILE
from tools.vault_setup import AppRoleCredentials

# The identity tests of a service's behaviour call it with, whatever the method: admitted on
# top of the service's own allowlist. tests/integration/test_tls.py checks the real allowlists.
TEST_CLIENT = "tester"

C = TypeVar("C")


async def wait_serving(target: str, task: asyncio.Task[None], tls: TlsConfig, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with new_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if task.done():
                task.result()  # re-raises the start-up error
                raise RuntimeError("service stopped before serving")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"service at {target} not serving after {timeout_s}s")
            await asyncio.sleep(0.2)


@asynccontextmanager
async def running(
    run: Callable[[asyncio.Event], Awaitable[None]], target: str, tls: TlsConfig
) -> AsyncIterator[asyncio.Task[None]]:
    """Runs a service until the block ends; ``tls`` is the identity its health is checked with."""
    stop = asyncio.Event()

    async def main() -> None:
        await run(stop)

    task = asyncio.create_task(main())
    try:
        await wait_serving(target, task, tls)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


def crypto_config(
    kafka_bootstrap: str,
    vault_addr: str,
    creds: AppRoleCredentials,
    store_dir: Path,
    topic_prefix: str,
    *,
    store: StoreSettings | None = None,
    key_name: str = "dicomsafe-dek",
    chunk_size: int = 64 * 1024,
    vault_timeout_s: float = 10.0,
) -> CryptoConfig:
    """A crypto service on a free port; small chunks so test instances span many of them.
    Objects go to ``store_dir``, or to ``store`` (e.g. an S3 bucket) when given."""
    return CryptoConfig(
        grpc_bind=f"127.0.0.1:{free_port()}",
        store=store or StoreSettings(url=file_url(store_dir)),
        chunk_size=chunk_size,
        max_object_bytes=64 * 1024 * 1024,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        vault=VaultSettings(
            addr=vault_addr,
            transit_mount="transit",
            key_name=key_name,
            role_id=creds.role_id,
            secret_id=creds.secret_id,
            timeout_s=vault_timeout_s,
        ),
    )


# One bucket for the whole test run; each test writes under a prefix of its own.
TEST_BUCKET = "dicomsafe-tests"
# S3's smallest part, so a test object of a few MiB is already a multipart upload.
TEST_PART_SIZE = 5 * 1024 * 1024


def s3_settings(s3: S3Endpoint) -> S3Settings:
    return S3Settings(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )


def s3_store_settings(s3: S3Endpoint, prefix: str, part_size: int = TEST_PART_SIZE) -> StoreSettings:
    """A crypto store in the test bucket under ``prefix``."""
    return StoreSettings(url=f"s3://{TEST_BUCKET}/{prefix}", s3=s3_settings(s3), part_size=part_size)


def with_tls(cfg: C, pki: Pki, identity: str) -> C:
    """``cfg`` serving with ``identity``'s certificate (mutual TLS, as deployed); its
    allowlist also admits the test client."""
    changes: dict[str, Any] = {"tls": pki.tls(identity)}
    allow = getattr(cfg, "grpc_allow", None)
    if isinstance(allow, PeerAllowlist):
        changes["grpc_allow"] = PeerAllowlist({m: who | {TEST_CLIENT} for m, who in allow.rules.items()})
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def authz_config(
    kafka_bootstrap: str, topic_prefix: str, issuer: LocalIssuer | None = None, **overrides: Any
) -> AuthzConfig:
    """An authz service on a free port with the deployed policy; with an issuer, tokens are
    verified. ``overrides`` set further fields (e.g. the grant store's ``mongodb_uri``)."""
    cfg = AuthzConfig(
        f"127.0.0.1:{free_port()}",
        POLICY_FILE,
        kafka_bootstrap,
        topic_prefix,
        oidc_issuer=issuer.url if issuer else "",
        oidc_jwks_url=issuer.jwks_url if issuer else "",
    )
    return dataclasses.replace(cfg, **overrides)


@asynccontextmanager
async def running_authz(cfg: AuthzConfig, pki: Pki) -> AsyncIterator[authz_pb2_grpc.AuthzServiceAsyncStub]:
    """The authz service of ``cfg`` (with its TLS identity) running, and a stub calling it as the tester."""
    cfg = with_tls(cfg, pki, "authz")
    async with (
        running(lambda stop: run_authz(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        yield authz_pb2_grpc.AuthzServiceStub(channel)


async def audit_config(
    kafka_bootstrap: str, topic_prefix: str, admin_uri: str, database: str, **overrides: Any
) -> AuditConfig:
    """An audit service on a free port over ``database``, provisioned here with the insert/find-only
    writer it runs as in production; ``overrides`` set further fields (authz target, intervals...)."""
    user, password = await provision_audit(admin_uri, database)
    cfg = AuditConfig(
        grpc_bind=f"127.0.0.1:{free_port()}",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        group_id=f"audit-{database}",
        mongodb_uri=user_uri(admin_uri, database, user, password),
        database=database,
    )
    return dataclasses.replace(cfg, **overrides)


def sealer_for(stub: crypto_pb2_grpc.CryptoServiceAsyncStub, cfg: CryptoConfig) -> Sealer:
    """What ingest and the gateway do to store an object: a key from this crypto service, the
    bytes sealed here and put into the same store."""
    return Sealer(stub, open_store(cfg.store), 60)
