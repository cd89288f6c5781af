"""The crypto service against a real Vault-API server (OpenBao) and Kafka."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import hvac
import hvac.exceptions
import pytest

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.storage.sealer import SealFailure
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.crypto.app import run
from services.crypto.config import CryptoConfig
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, sealer_for, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki

CHUNK = 64 * 1024  # small chunks so a few-MB instance spans many of them


def _config(
    pki: Pki, servers: Servers, tmp_path: Path, creds: vault_setup.AppRoleCredentials, unique: str, vault_addr: str = ""
) -> CryptoConfig:
    return with_tls(
        crypto_config(
            servers.kafka_bootstrap,
            vault_addr or servers.vault_addr,
            creds,
            tmp_path / "store",
            f"t{unique}.",
            chunk_size=CHUNK,
            vault_timeout_s=3.0,
        ),
        pki,
        "crypto",
    )


@pytest.fixture
def creds(servers: Servers) -> vault_setup.AppRoleCredentials:
    return vault_setup.provision(servers.vault_addr, servers.vault_token)


@pytest.fixture
async def crypto(
    pki: Pki, servers: Servers, tmp_path: Path, creds: vault_setup.AppRoleCredentials, unique: str
) -> AsyncIterator[tuple[crypto_pb2_grpc.CryptoServiceAsyncStub, CryptoConfig]]:
    cfg = _config(pki, servers, tmp_path, creds, unique)
    await ensure_topics(servers.kafka_bootstrap, topic_specs(Topics(cfg.topic_prefix), partitions=1))
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        yield crypto_pb2_grpc.CryptoServiceStub(channel), cfg


def _meta(data: bytes) -> crypto_pb2.SealMetadata:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    sha = hashlib.sha256(data).hexdigest()
    return crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, sha),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        expected_sha256=sha,
        expected_size=len(data),
    )


async def _open(
    stub: crypto_pb2_grpc.CryptoServiceAsyncStub, object_id: str, offset: int = 0, length: int = 0
) -> bytes:
    parts = [p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=object_id, offset=offset, length=length))]
    return b"".join(parts)


def _samples() -> list[tuple[str, bytes]]:
    bundled = dicom_samples.bundled_files()[0]
    return [
        (bundled.name, bundled.read_bytes()),
        ("us-multiframe", dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=None, seed=7, frames=6))),
        ("rle", dicom_samples.to_bytes(dicom_samples.rle_lossless_ct(study_uid=None, seed=8))),
    ]


@pytest.mark.parametrize("name,data", _samples(), ids=lambda v: v if isinstance(v, str) else "")
async def test_seal_then_open_round_trips_and_leaves_no_plaintext_on_disk(crypto, name: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    meta = _meta(data)
    sealed = await sealer_for(stub, cfg).seal(data, meta)
    assert not sealed.already_stored
    assert sealed.plaintext_sha256 == meta.expected_sha256
    assert sealed.object.plaintext_size == len(data)
    assert sealed.object.key_name == "dicomsafe-dek" and sealed.object.key_version >= 1

    files = list((cfg.store_dir).rglob("*.dso"))
    assert len(files) == 1
    on_disk = files[0].read_bytes()
    assert len(on_disk) == sealed.object.sealed_size
    assert b"DICM" not in on_disk
    assert dicom_samples.SYNTHETIC_MARKER not in on_disk
    assert data[-4096:] not in on_disk  # pixel data tail
    assert b"vault:v" in on_disk  # only the wrapped form of the data key is stored

    assert await _open(stub, meta.object_id) == data
    assert await _open(stub, meta.object_id, offset=1000, length=CHUNK * 2) == data[1000 : 1000 + CHUNK * 2]
    desc = await stub.Describe(crypto_pb2.DescribeRequest(object_id=meta.object_id))
    assert desc.sop_instance_uid == meta.sop_instance_uid
    assert desc.plaintext_size == len(data)
    assert not list(cfg.store_dir.rglob("*.tmp"))


async def test_resealing_the_same_object_is_idempotent(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    data = _samples()[0][1]
    meta = _meta(data)
    sealer = sealer_for(stub, cfg)
    first = await sealer.seal(data, meta)
    path = next(cfg.store_dir.rglob("*.dso"))
    before = path.read_bytes()
    again = await sealer.seal(data, meta)
    assert again.already_stored
    assert again.object.sealed_size == first.object.sealed_size
    assert path.read_bytes() == before


async def test_hash_mismatch_is_refused_and_nothing_is_stored(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    data = _samples()[0][1]
    meta = _meta(data)
    meta.expected_sha256 = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(SealFailure) as info:
        await sealer_for(stub, cfg).seal(data, meta)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not list(cfg.store_dir.rglob("*.dso"))
    assert not list(cfg.store_dir.rglob("*.tmp"))


async def test_large_object_in_odd_pieces_round_trips_through_the_seal_pipeline(crypto) -> None:  # type: ignore[no-untyped-def]
    # Several batches and background syncs, pieces that straddle chunk and batch boundaries.
    stub, cfg = crypto
    data = os.urandom(9 * 1024 * 1024 + 12345)
    sha = hashlib.sha256(data).hexdigest()
    meta = crypto_pb2.SealMetadata(
        object_id=sha,
        sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3",
        expected_sha256=sha,
        expected_size=len(data),
    )
    sealed = await sealer_for(stub, cfg).seal(data, meta)
    chunks = -(-len(data) // CHUNK)
    assert sealed.plaintext_sha256 == sha
    header_len = sealed.object.sealed_size - len(data) - chunks * fmt.TAG_SIZE
    assert next(cfg.store_dir.rglob("*.dso")).stat().st_size == sealed.object.sealed_size
    assert 0 < header_len <= fmt.MAX_HEADER_SIZE
    assert await _open(stub, sha) == data
    assert not list(cfg.store_dir.rglob("*.tmp"))


async def test_seal_over_the_size_limit_is_refused_before_a_key_is_issued(
    pki: Pki, servers: Servers, tmp_path: Path, creds: vault_setup.AppRoleCredentials, unique: str
) -> None:
    # No expected_size from the caller: the sealer sends the size it holds, crypto refuses it.
    cfg = dataclasses.replace(_config(pki, servers, tmp_path, creds, unique), max_object_bytes=3 * 1024 * 1024)
    await ensure_topics(servers.kafka_bootstrap, topic_specs(Topics(cfg.topic_prefix), partitions=1))
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        data = os.urandom(5 * 1024 * 1024)
        meta = crypto_pb2.SealMetadata(object_id="ab" * 32, sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3")
        with pytest.raises(SealFailure) as info:
            await sealer_for(stub, cfg).seal(data, meta)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not list(cfg.store_dir.rglob("*.dso"))
    assert not list(cfg.store_dir.rglob("*.tmp"))


async def test_bad_object_ids_are_refused(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    data = _samples()[0][1]
    meta = _meta(data)
    meta.object_id = "../../etc/passwd"
    with pytest.raises(SealFailure) as info:
        await sealer_for(stub, cfg).seal(data, meta)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _open(stub, "nothex")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _open(stub, "0" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tampered_ciphertext_fails_with_data_loss(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    data = _samples()[1][1]
    meta = _meta(data)
    await sealer_for(stub, cfg).seal(data, meta)
    path = next(cfg.store_dir.rglob("*.dso"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _open(stub, meta.object_id)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS


async def _sealed_path(
    stub: crypto_pb2_grpc.CryptoServiceAsyncStub, cfg: CryptoConfig, seed: int
) -> tuple[str, Path, bytes]:
    data = dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=None, seed=seed, frames=6))
    meta = _meta(data)
    await sealer_for(stub, cfg).seal(data, meta)
    return meta.object_id, next(cfg.store_dir.rglob(f"{meta.object_id}.dso")), data


async def _open_code(
    stub: crypto_pb2_grpc.CryptoServiceAsyncStub, object_id: str, offset: int = 0, length: int = 0
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _open(stub, object_id, offset, length)
    return err.value.code()


async def test_swapped_or_truncated_object_files_fail_with_data_loss(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    a_id, a_path, _ = await _sealed_path(stub, cfg, 21)
    b_id, b_path, _ = await _sealed_path(stub, cfg, 22)
    c_id, c_path, c_data = await _sealed_path(stub, cfg, 23)
    # Two objects' files swapped on disk: each file now sits under the other's id.
    a_raw, b_raw = a_path.read_bytes(), b_path.read_bytes()
    a_path.write_bytes(b_raw)
    b_path.write_bytes(a_raw)
    for object_id in (a_id, b_id):
        assert await _open_code(stub, object_id) == grpc.StatusCode.DATA_LOSS
        assert await _open_code(stub, object_id, 0, 100) == grpc.StatusCode.DATA_LOSS
    # B's chunks behind A's header: every chunk fails authentication under A's key and binding.
    header_len = fmt.read_header(io.BytesIO(a_raw))[1]
    b_header_len = fmt.read_header(io.BytesIO(b_raw))[1]
    a_path.write_bytes(a_raw[:header_len] + b_raw[b_header_len:])
    assert await _open_code(stub, a_id) == grpc.StatusCode.DATA_LOSS
    assert await _open_code(stub, a_id, 0, 100) == grpc.StatusCode.DATA_LOSS
    # Truncated: at a chunk boundary (the file size alone looks like a shorter object), inside
    # a chunk, and inside the header.
    c_raw = c_path.read_bytes()
    c_header_len = fmt.read_header(io.BytesIO(c_raw))[1]
    assert len(c_data) > 3 * CHUNK
    for cut in (c_header_len + 2 * (CHUNK + 16), len(c_raw) - 5, c_header_len - 3):
        c_path.write_bytes(c_raw[:cut])
        assert await _open_code(stub, c_id) == grpc.StatusCode.DATA_LOSS, cut
        assert await _open_code(stub, c_id, 0, 100) == grpc.StatusCode.DATA_LOSS, cut
    c_path.write_bytes(c_raw)
    assert await _open(stub, c_id) == c_data  # the untouched bytes still open


async def test_range_open_streams_one_chunk_per_message(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    object_id, _, data = await _sealed_path(stub, cfg, 24)
    offset, length = CHUNK // 2, 3 * CHUNK
    pieces = [
        p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=object_id, offset=offset, length=length))
    ]
    assert b"".join(pieces) == data[offset : offset + length]
    assert [len(p) for p in pieces] == [CHUNK // 2, CHUNK, CHUNK, CHUNK // 2]


async def test_vault_unreachable_fails_closed(pki: Pki, servers: Servers, tmp_path: Path, creds, unique: str) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(pki, servers, tmp_path, creds, unique, vault_addr="http://127.0.0.1:1")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(Topics(cfg.topic_prefix), partitions=1))
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        data = _samples()[0][1]
        with pytest.raises(SealFailure) as info:
            await sealer_for(stub, cfg).seal(data, _meta(data))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.retryable
    assert not list(cfg.store_dir.rglob("*.dso"))
    assert not list(cfg.store_dir.rglob("*.tmp"))


def test_crypto_vault_identity_is_least_privilege(servers: Servers, creds: vault_setup.AppRoleCredentials) -> None:
    client = hvac.Client(url=servers.vault_addr)
    client.auth.approle.login(role_id=creds.role_id, secret_id=creds.secret_id)
    transit = client.secrets.transit
    # Data keys are generated by the service and wrapped by encrypt; Vault's datakey is not granted.
    assert transit.encrypt_data("dicomsafe-dek", plaintext="aGVsbG8=")["data"]["ciphertext"].startswith("vault:v")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.generate_data_key("dicomsafe-dek", key_type="plaintext")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.generate_data_key("dicomsafe-dek", key_type="wrapped")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.update_key_configuration("dicomsafe-dek", exportable=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.export_key("dicomsafe-dek", key_type="encryption-key")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.delete_key("dicomsafe-dek")
    with pytest.raises(hvac.exceptions.Forbidden):
        transit.encrypt_data("dicomsafe-pseudonym", plaintext="aGVsbG8=")


async def test_prepare_seal_answers_each_object_in_order(crypto) -> None:  # type: ignore[no-untyped-def]
    """The key broker's batch: a new object gets its header and content key, a stored one its
    description and no key, another object under a claimed SOP Instance UID and a bad id are
    refused, each on its own; an empty or oversized batch is refused whole."""
    stub, cfg = crypto
    stored, new = _samples()[0][1], _samples()[1][1]
    stored_meta, new_meta = _meta(stored), _meta(new)
    await sealer_for(stub, cfg).seal(stored, stored_meta)
    same_uid = crypto_pb2.SealMetadata()
    same_uid.CopyFrom(stored_meta)
    same_uid.object_id = "ef" * 32  # other content under the stored instance's SOP Instance UID
    bad = crypto_pb2.SealMetadata(object_id="../x", sop_instance_uid="1.2.3", study_instance_uid="1.2")
    reply = await stub.PrepareSeal(crypto_pb2.PrepareSealRequest(objects=[new_meta, stored_meta, same_uid, bad]))
    S = crypto_pb2.PrepareStatus
    assert [p.status for p in reply.objects] == [
        S.PREPARE_STATUS_READY,
        S.PREPARE_STATUS_ALREADY_STORED,
        S.PREPARE_STATUS_DUPLICATE_SOP_INSTANCE,
        S.PREPARE_STATUS_INVALID,
    ]
    ready, already, duplicate, invalid = reply.objects
    header, _ = fmt.SealedHeader.decode(ready.header)
    assert header.object_id == new_meta.object_id and header.wrapped_dek.startswith("vault:v")
    assert len(ready.content_key) == 32
    assert already.object.plaintext_size == len(stored) and not already.content_key and not already.header
    assert not duplicate.content_key and not invalid.content_key and "hex" in invalid.detail
    # The key issued for one object opens that object only: not the one stored before it.
    sealed_new = b"".join(
        [(w := fmt.SealWriter(ready.content_key, header)).header_bytes(), w.update(new), w.finalize()]
    )
    assert fmt.open_bytes(ready.content_key, sealed_new)[1] == new
    stored_bytes = next(cfg.store_dir.rglob(f"{stored_meta.object_id}.dso")).read_bytes()
    with pytest.raises(fmt.SealedFormatError):
        fmt.open_bytes(ready.content_key, stored_bytes)
    for objects in ([], [new_meta] * 65):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PrepareSeal(crypto_pb2.PrepareSealRequest(objects=objects))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_seals_share_prepare_calls(crypto) -> None:  # type: ignore[no-untyped-def]
    stub, cfg = crypto
    data = [
        dicom_samples.to_bytes(dicom_samples.ct_image(study_uid=None, seed=s, rows=32, columns=32)) for s in range(12)
    ]
    sealer = sealer_for(stub, cfg)
    sealed = await asyncio.gather(*(sealer.seal(d, _meta(d)) for d in data))
    assert [s.plaintext_sha256 for s in sealed] == [hashlib.sha256(d).hexdigest() for d in data]
    assert sealer.prepare_calls <= 2, "a study's instances in flight share their key requests"
    for d, s in zip(data, sealed, strict=True):
        assert await _open(stub, s.object.object_id) == d
