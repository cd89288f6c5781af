"""GDPR erasure by crypto-shredding on a real OpenBao: one patient's objects become unreadable,
everyone else's still open; refused without the role; the crypto identity cannot do it."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import hvac
import hvac.exceptions
import pytest

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.authz.app import run as run_authz
from services.authz.config import AuthzConfig
from services.crypto.app import run as run_crypto
from services.crypto.config import CryptoConfig
from services.ingest.sealing import Sealer, object_id_for
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, free_port, running, with_tls
from tools import dicom_samples, vault_setup
from tools.erase_patient import ErasureRefused, ErasureRequest, erase_patient
from tools.pki import Pki
from tools.stack import POLICY_FILE

if TYPE_CHECKING:
    Stub = crypto_pb2_grpc.CryptoServiceAsyncStub


@pytest.fixture
async def stack(
    pki: Pki, servers: Servers, tmp_path: Path, unique: str
) -> AsyncIterator[tuple[Stub, CryptoConfig, str]]:
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token)
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    crypto_cfg = with_tls(
        crypto_config(
            servers.kafka_bootstrap, servers.vault_addr, creds, tmp_path / "store", topics.prefix, chunk_size=16 * 1024
        ),
        pki,
        "crypto",
    )
    authz_cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix), pki, "authz"
    )
    async with (
        running(lambda stop: run_crypto(crypto_cfg, stop), crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        running(lambda stop: run_authz(authz_cfg, stop), authz_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        yield crypto_pb2_grpc.CryptoServiceStub(channel), crypto_cfg, authz_cfg.grpc_bind


async def _seal(stub: Stub, patient_id: str, seed: int) -> tuple[str, bytes]:
    patient = dicom_samples.synthetic_patient(seed)
    ds = dicom_samples.ct_image(study_uid=None, seed=seed, rows=64, columns=64, patient=patient)
    ds.PatientID = patient_id
    data = dicom_samples.to_bytes(ds)
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, hashlib.sha256(data).hexdigest()),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        patient_id=patient_id,
        issuer_of_patient_id="HOSP-A",
    )
    await Sealer(stub, 64 * 1024, 60).seal(data, meta)
    return meta.object_id, data


async def _open(stub: Stub, object_id: str) -> bytes:
    return b"".join([p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=object_id))])


async def test_erasing_one_patient_shreds_only_their_objects(pki: Pki, stack, servers: Servers, unique: str) -> None:  # type: ignore[no-untyped-def]
    stub, cfg, authz_target = stack
    alice = [await _seal(stub, f"ALICE-{unique}", seed) for seed in (1, 2)]
    bob = [await _seal(stub, f"BOB-{unique}", 3)]
    desc = await stub.Describe(crypto_pb2.DescribeRequest(object_id=alice[0][0]))
    same_patient = await stub.Describe(crypto_pb2.DescribeRequest(object_id=alice[1][0]))
    other = await stub.Describe(crypto_pb2.DescribeRequest(object_id=bob[0][0]))
    assert desc.erasure_key_ref and desc.erasure_key_ref == same_patient.erasure_key_ref != other.erasure_key_ref
    for path in cfg.store_dir.rglob("*.dso"):
        assert f"ALICE-{unique}".encode() not in path.read_bytes()  # only a keyed pseudonym is stored

    # The crypto service's own identity may not destroy erasure keys.
    crypto_client = hvac.Client(url=servers.vault_addr)
    crypto_client.auth.approle.login(role_id=cfg.vault.role_id, secret_id=cfg.vault.secret_id)
    with pytest.raises(hvac.exceptions.Forbidden):
        crypto_client.secrets.kv.v2.delete_metadata_and_all_versions(
            desc.erasure_key_ref, mount_point="dicomsafe-erasure"
        )

    officer = vault_setup.erasure_officer_token(servers.vault_addr, servers.vault_token)
    topics = Topics(cfg.topic_prefix)
    with pytest.raises(ErasureRefused, match=r"no role of the subject grants patient\.erase"):
        await erase_patient(
            ErasureRequest("dr.house", f"ALICE-{unique}", "HOSP-A", "curious"),
            servers.vault_addr, officer, authz_target, pki.tls("ops"), servers.kafka_bootstrap, topics,
        )  # fmt: skip
    for object_id, data in alice + bob:
        assert await _open(stub, object_id) == data  # a refused erasure changed nothing

    ref = await erase_patient(
        ErasureRequest("dpo.lee", f"ALICE-{unique}", "HOSP-A", "GDPR art. 17 request #42"),
        servers.vault_addr, officer, authz_target, pki.tls("ops"), servers.kafka_bootstrap, topics,
    )  # fmt: skip
    assert ref == desc.erasure_key_ref
    for object_id, _ in alice:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _open(stub, object_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await _open(stub, bob[0][0]) == bob[0][1]


async def test_objects_without_patient_id_have_no_erasure_layer(stack) -> None:  # type: ignore[no-untyped-def]
    stub, _, _ = stack
    ds = dicom_samples.mr_image(study_uid=None, seed=5)
    data = dicom_samples.to_bytes(ds)
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, hashlib.sha256(data).hexdigest()),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
    )
    await Sealer(stub, 64 * 1024, 60).seal(data, meta)
    assert (await stub.Describe(crypto_pb2.DescribeRequest(object_id=meta.object_id))).erasure_key_ref == ""
    assert await _open(stub, meta.object_id) == data
