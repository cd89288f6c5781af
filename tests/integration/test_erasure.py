"""GDPR erasure by crypto-shredding on a real OpenBao: one patient's objects become unreadable,
everyone else's still open; refused without a verified officer's token (authz verifies it
against a real OIDC issuer), refused when the audit trail cannot record it first; the crypto
identity cannot do it."""

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
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.v1 import audit_pb2, crypto_pb2, crypto_pb2_grpc
from services.authz.app import run as run_authz
from services.crypto.app import run as run_crypto
from services.crypto.config import CryptoConfig
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, authz_config, crypto_config, running, sealer_for, with_tls
from tests.topic_reader import read_to_end
from tools import dicom_samples, vault_setup
from tools.erase_patient import ErasureRefused, ErasureRequest, erase_patient
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki
from tools.ports import free_port

if TYPE_CHECKING:
    Stub = crypto_pb2_grpc.CryptoServiceAsyncStub


@pytest.fixture
async def stack(
    pki: Pki, servers: Servers, idp: LocalIssuer, tmp_path: Path, unique: str
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
    # As in production: authz verifies users' OIDC access tokens (a real issuer on loopback).
    authz_cfg = with_tls(authz_config(servers.kafka_bootstrap, topics.prefix, idp), pki, "authz")
    async with (
        running(lambda stop: run_crypto(crypto_cfg, stop), crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        running(lambda stop: run_authz(authz_cfg, stop), authz_cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(crypto_cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        yield crypto_pb2_grpc.CryptoServiceStub(channel), crypto_cfg, authz_cfg.grpc_bind


async def _seal(stub: Stub, cfg: CryptoConfig, patient_id: str, seed: int) -> tuple[str, bytes]:
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
    await sealer_for(stub, cfg).seal(data, meta)
    return meta.object_id, data


async def _open(stub: Stub, object_id: str) -> bytes:
    return b"".join([p.data async for p in stub.Open(crypto_pb2.OpenRequest(object_id=object_id))])


async def test_erasing_one_patient_shreds_only_their_objects(  # type: ignore[no-untyped-def]
    pki: Pki, stack, servers: Servers, idp: LocalIssuer, unique: str
) -> None:
    stub, cfg, authz_target = stack
    alice = [await _seal(stub, cfg, f"ALICE-{unique}", seed) for seed in (1, 2)]
    bob = [await _seal(stub, cfg, f"BOB-{unique}", 3)]
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

    async def erase(token: str, reason: str = "GDPR art. 17 request #42", kafka: str = servers.kafka_bootstrap) -> str:
        request = ErasureRequest(token, f"ALICE-{unique}", "HOSP-A", reason)
        return await erase_patient(request, servers.vault_addr, officer, authz_target, pki.tls("ops"), kafka, topics)

    # Gate 1, authz: the subject comes from a verified token, never from what the caller claims.
    with pytest.raises(ErasureRefused, match="access token"):
        await erase("")
    with pytest.raises(ErasureRefused, match="unauthenticated"):
        await erase("not-a-token")
    with pytest.raises(ErasureRefused, match="unauthenticated"):
        await erase(idp.token("dpo.lee", issuer="https://impostor.example"))
    with pytest.raises(ErasureRefused, match=r"no role of the subject grants patient\.erase"):
        await erase(idp.token("dr.house"), reason="curious")
    # Audit first: an officer's erasure that the trail cannot record destroys nothing.
    with pytest.raises(ErasureRefused, match="audit trail unavailable"):
        await erase(idp.token("dpo.lee"), kafka=f"127.0.0.1:{free_port()}")
    for object_id, data in alice + bob:
        assert await _open(stub, object_id) == data  # refused erasures changed nothing

    ref = await erase(idp.token("dpo.lee"))
    assert ref == desc.erasure_key_ref
    for object_id, _ in alice:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _open(stub, object_id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await _open(stub, bob[0][0]) == bob[0][1]
    assert await erase(idp.token("dpo.lee")) == ref  # running it again is harmless

    events = [audit_pb2.AuditEvent.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.audit)]
    erasure = [e for e in events if e.service == "erasure"]
    A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
    assert [(e.action, e.outcome) for e in erasure] == [
        (A.AUDIT_ACTION_PATIENT_ERASURE_REQUESTED, Out.AUDIT_OUTCOME_SUCCESS),
        (A.AUDIT_ACTION_PATIENT_ERASED, Out.AUDIT_OUTCOME_SUCCESS),
    ] * 2  # the refused attempts left no erasure events, each run one request and one completion
    for requested, completed in (erasure[0:2], erasure[2:4]):
        assert completed.details["request_event_id"] == requested.event_id
        for e in (requested, completed):
            assert (e.actor, list(e.actor_roles), e.patient_ref) == ("dpo.lee", ["privacy_officer"], ref)
            assert e.reason == "GDPR art. 17 request #42"
        assert requested.occurred_at.ToNanoseconds() <= completed.occurred_at.ToNanoseconds()
    decisions = [
        (e.actor, e.outcome, e.details["authenticated"])
        for e in events
        if e.action == A.AUDIT_ACTION_ACCESS_DECISION and e.details["action"] == "patient.erase"
    ]
    assert ("dr.house", Out.AUDIT_OUTCOME_DENIED, "token") in decisions
    assert decisions.count(("dpo.lee", Out.AUDIT_OUTCOME_SUCCESS, "token")) == 3  # two erasures, one unrecordable
    assert all(f"ALICE-{unique}" not in str(e) for e in events)  # only the pseudonym reaches the trail


async def test_objects_without_patient_id_have_no_erasure_layer(stack) -> None:  # type: ignore[no-untyped-def]
    stub, cfg, _ = stack
    ds = dicom_samples.mr_image(study_uid=None, seed=5)
    data = dicom_samples.to_bytes(ds)
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, hashlib.sha256(data).hexdigest()),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
    )
    await sealer_for(stub, cfg).seal(data, meta)
    assert (await stub.Describe(crypto_pb2.DescribeRequest(object_id=meta.object_id))).erasure_key_ref == ""
    assert await _open(stub, meta.object_id) == data
