"""Rotation on a real OpenBao: rotate → rewrap → retire old versions → every object still opens."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.crypto.app import run
from services.crypto.config import CryptoConfig
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, sealer_for, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = crypto_pb2_grpc.CryptoServiceAsyncStub


@pytest.fixture
async def crypto(pki: Pki, servers: Servers, tmp_path: Path, unique: str) -> AsyncIterator[tuple[Stub, CryptoConfig]]:
    key = f"rot-{unique}"  # its own key: rotating must not disturb other tests sharing the Vault
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token, key_name=key)
    cfg = with_tls(
        crypto_config(
            servers.kafka_bootstrap,
            servers.vault_addr,
            creds,
            tmp_path / "store",
            f"t{unique}.",
            key_name=key,
            chunk_size=16 * 1024,
        ),
        pki,
        "crypto",
    )
    await ensure_topics(servers.kafka_bootstrap, topic_specs(Topics(cfg.topic_prefix), partitions=1))
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        yield crypto_pb2_grpc.CryptoServiceStub(ch), cfg


async def _seal(stub: Stub, cfg: CryptoConfig, seed: int) -> tuple[str, bytes]:
    ds = dicom_samples.ct_image(study_uid=None, seed=seed, rows=128, columns=128)
    data = dicom_samples.to_bytes(ds)
    sha = hashlib.sha256(data).hexdigest()
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, sha),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
    )
    await sealer_for(stub, cfg).seal(data, meta)
    return meta.object_id, data


async def _open(stub: Stub, object_id: str) -> bytes:
    return b"".join([p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=object_id))])


def _split(path: Path) -> tuple[fmt.SealedHeader, bytes]:
    raw = path.read_bytes()
    header, header_len = fmt.SealedHeader.decode(raw)
    return header, raw[header_len:]


async def test_rotate_rewrap_retire_keeps_every_object_readable(crypto, tmp_path: Path, servers: Servers) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    old = [await _seal(stub, cfg, seed) for seed in range(3)]
    status = await stub.GetKeyStatus(crypto_pb2.KeyStatusRequest())
    assert status.latest_version == 1

    rotated = await stub.RotateKey(crypto_pb2.RotateKeyRequest())
    assert rotated.latest_version == 2
    new = [await _seal(stub, cfg, seed) for seed in range(10, 12)]
    store = cfg.store_dir
    paths = {oid: next(store.rglob(f"{oid}.dso")) for oid, _ in old + new}
    assert {_split(paths[oid])[0].key_version for oid, _ in new} == {2}

    # Keep a copy of one object as it was before the rewrap: after retiring v1 it must fail.
    stale = tmp_path / "stale.dso"
    shutil.copy(paths[old[0][0]], stale)
    before = {oid: _split(paths[oid]) for oid in paths}

    progress = [p async for p in stub.Rewrap(crypto_pb2.RewrapRequest())]
    final = progress[-1]
    assert final.done and final.total == 5 and final.scanned == 5
    assert (final.rewrapped, final.already_current, final.failed) == (3, 2, 0)
    assert dict(final.versions_before) == {1: 3, 2: 2}

    for oid in paths:
        header, chunks = _split(paths[oid])
        assert header.key_version == 2
        old_header, old_chunks = before[oid]
        assert chunks == old_chunks  # ciphertext untouched: only the header changed
        assert (header.nonce_prefix, header.object_id, header.sop_instance_uid) == (
            old_header.nonce_prefix,
            old_header.object_id,
            old_header.sop_instance_uid,
        )

    again = [p async for p in stub.Rewrap(crypto_pb2.RewrapRequest())][-1]
    assert (again.rewrapped, again.already_current) == (0, 5)  # resumable / idempotent

    vault_setup.retire_versions_below(servers.vault_addr, servers.vault_token, 2, key_name=cfg.vault.key_name)
    status = await stub.GetKeyStatus(crypto_pb2.KeyStatusRequest())
    assert status.min_decryption_version == 2
    for oid, data in old + new:
        assert await _open(stub, oid) == data

    shutil.copy(stale, paths[old[0][0]])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _open(stub, old[0][0])
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
