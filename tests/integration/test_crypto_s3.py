"""The crypto service sealing into a real S3 server and opening from it, one replica and two."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.storage.object_store import ObjectStore, StoreSettings, open_store
from dicomsafe.storage.sealer import Sealer
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.crypto.app import run
from services.crypto.config import CryptoConfig
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, s3_store_settings, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki
from tools.ports import free_port

if TYPE_CHECKING:
    from dicomsafe.v1.crypto_pb2_grpc import CryptoServiceAsyncStub as Stub

CHUNK = 64 * 1024


def _config(
    pki: Pki, servers: Servers, tmp_path: Path, creds: vault_setup.AppRoleCredentials, store: StoreSettings, unique: str
) -> CryptoConfig:
    cfg = crypto_config(
        servers.kafka_bootstrap,
        servers.vault_addr,
        creds,
        tmp_path / "unused-store",
        f"t{unique}.",
        store=store,
        chunk_size=CHUNK,
    )
    return with_tls(cfg, pki, "crypto")


@pytest.fixture
def creds(servers: Servers) -> vault_setup.AppRoleCredentials:
    return vault_setup.provision(servers.vault_addr, servers.vault_token)


@pytest.fixture
def store_settings(servers: Servers, unique: str) -> StoreSettings:
    return s3_store_settings(servers.s3, f"crypto-{unique}")


async def _replicas(
    n: int,
    pki: Pki,
    servers: Servers,
    tmp_path: Path,
    creds: vault_setup.AppRoleCredentials,
    store: StoreSettings,
    unique: str,
    stack: AsyncExitStack,
) -> list[Stub]:
    """``n`` crypto services (each with its own port, like pods on different nodes) over one store."""
    base = _config(pki, servers, tmp_path, creds, store, unique)
    await ensure_topics(servers.kafka_bootstrap, topic_specs(Topics(base.topic_prefix), partitions=1))
    stubs: list[Stub] = []
    for i in range(n):
        cfg = base if i == 0 else dataclasses.replace(base, grpc_bind=f"127.0.0.1:{free_port()}")
        await stack.enter_async_context(running(functools.partial(run, cfg), cfg.grpc_bind, pki.tls(TEST_CLIENT)))
        channel = await stack.enter_async_context(new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)))
        stubs.append(crypto_pb2_grpc.CryptoServiceStub(channel))
    return stubs


@pytest.fixture
async def crypto(
    pki: Pki,
    servers: Servers,
    tmp_path: Path,
    creds: vault_setup.AppRoleCredentials,
    store_settings: StoreSettings,
    unique: str,
) -> AsyncIterator[Stub]:
    async with AsyncExitStack() as stack:
        (stub,) = await _replicas(1, pki, servers, tmp_path, creds, store_settings, unique, stack)
        yield stub


def _meta(data: bytes, sop: str) -> crypto_pb2.SealMetadata:
    sha = hashlib.sha256(data).hexdigest()
    return crypto_pb2.SealMetadata(
        object_id=sha, sop_instance_uid=sop, study_instance_uid="1.2.3", expected_sha256=sha, expected_size=len(data)
    )


async def _open(stub: Stub, object_id: str, offset: int = 0, length: int = 0) -> bytes:
    req = crypto_pb2.OpenRequest(object_id=object_id, offset=offset, length=length)
    return b"".join([p.data async for p in stub.Open(req)])


def _stored(store: ObjectStore, object_id: str) -> bytes:
    with store.open_read(object_id) as f:
        return f.read()


async def test_seal_to_s3_and_open_whole_and_ranges(crypto: Stub, store_settings: StoreSettings) -> None:
    instance = dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=None, seed=31, frames=6))
    large = os.urandom(12 * 1024 * 1024 + 777)  # a multipart upload: three 5 MiB parts
    store = await asyncio.to_thread(open_store, store_settings)
    for data, sop in ((instance, "1.2.3.1"), (large, "1.2.3.2")):
        meta = _meta(data, sop)
        sealed = await Sealer(crypto, store, 60).seal(data, meta)
        assert not sealed.already_stored
        assert sealed.plaintext_sha256 == meta.expected_sha256
        raw = await asyncio.to_thread(_stored, store, meta.object_id)
        # The bucket holds sealed bytes only: the wrapped key, never plaintext.
        assert len(raw) == sealed.object.sealed_size
        assert data[-4096:] not in raw and data[:4096] not in raw
        assert b"vault:v" in raw
        assert await _open(crypto, meta.object_id) == data
        assert (
            await _open(crypto, meta.object_id, 5 * 1024 * 1024 - 100, 3 * CHUNK)
            == data[5 * 1024 * 1024 - 100 : 5 * 1024 * 1024 - 100 + 3 * CHUNK]
        )
        desc = await crypto.Describe(crypto_pb2.DescribeRequest(object_id=meta.object_id))
        assert desc.plaintext_size == len(data) and desc.sealed_size == len(raw)
        again = await Sealer(crypto, store, 60).seal(data, meta)
        assert again.already_stored
        assert await asyncio.to_thread(_stored, store, meta.object_id) == raw
    assert sorted(await asyncio.to_thread(lambda: list(store.object_ids()))) == sorted(
        hashlib.sha256(d).hexdigest() for d in (instance, large)
    )


async def test_two_replicas_share_one_store(
    pki: Pki,
    servers: Servers,
    tmp_path: Path,
    creds: vault_setup.AppRoleCredentials,
    store_settings: StoreSettings,
    unique: str,
) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _replicas(2, pki, servers, tmp_path, creds, store_settings, unique, stack)
        # Two writers on one bucket, as two ingest or gateway pods are, each with its crypto replica.
        store = await asyncio.to_thread(open_store, store_settings)
        data = os.urandom(6 * 1024 * 1024 + 5)
        meta = _meta(data, "1.2.3.10")
        # One seals, the other opens and describes it: no state outside the store and Vault.
        sealed = await Sealer(a, store, 60).seal(data, meta)
        assert await _open(b, meta.object_id) == data
        assert await _open(b, meta.object_id, 1_000_000, 50_000) == data[1_000_000:1_050_000]
        desc = await b.Describe(crypto_pb2.DescribeRequest(object_id=meta.object_id))
        assert desc.sealed_size == sealed.object.sealed_size
        # Redelivered to the other replica: recognised as stored there too.
        assert (await Sealer(b, store, 60).seal(data, meta)).already_stored
        # The same new instance reaching both replicas at once: both succeed, both open it.
        other = os.urandom(300_000)
        other_meta = _meta(other, "1.2.3.11")
        results = await asyncio.gather(
            Sealer(a, store, 60).seal(other, other_meta), Sealer(b, store, 60).seal(other, other_meta)
        )
        assert all(r.plaintext_sha256 == other_meta.expected_sha256 or r.already_stored for r in results)
        assert await _open(a, other_meta.object_id) == other
        assert await _open(b, other_meta.object_id) == other
