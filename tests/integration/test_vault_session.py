"""The crypto service's Vault identity on a real OpenBao: login tokens are renewed before they
run out (and replaced by a fresh login at their maximum TTL), and a Vault that refuses the
login answers UNAVAILABLE — never DATA_LOSS or UNKNOWN — on Open and Seal."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import grpc
import hvac
import pytest

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.common.vault import VaultAuth, VaultSession, VaultUnavailable
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.storage.sealer import SealFailure
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.crypto.app import run as run_crypto
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, sealer_for, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki
from tools.ports import free_port


def _short_lived_role(servers: Servers, name: str, ttl: str, max_ttl: str) -> VaultAuth:
    """An AppRole with the crypto service's own policy, but tokens that expire in seconds."""
    vault_setup.provision(servers.vault_addr, servers.vault_token)
    admin = hvac.Client(url=servers.vault_addr, token=servers.vault_token)
    admin.auth.approle.create_or_update_approle(
        name, token_policies=[vault_setup.POLICY_NAME], token_ttl=ttl, token_max_ttl=max_ttl
    )
    role_id = admin.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    return VaultAuth(addr=servers.vault_addr, role_id=role_id, secret_id=secret_id)


def _key_status(session: VaultSession) -> dict[str, object]:
    return session.call("key status", lambda c: c.secrets.transit.read_key("dicomsafe-dek"))


def _ttl_left(session: VaultSession) -> int:
    return int(session.client.auth.token.lookup_self()["data"]["ttl"])


def test_the_login_token_is_renewed_before_it_expires(servers: Servers, unique: str) -> None:
    session = VaultSession(_short_lived_role(servers, f"renew-{unique}", ttl="6s", max_ttl="120s"))
    _key_status(session)
    token = session.client.token
    assert (session.logins, session.renewals) == (1, 0)
    time.sleep(4.5)  # less than a third of the 6 s left: the next call renews first
    _key_status(session)
    assert (session.logins, session.renewals) == (1, 1)
    time.sleep(4.5)  # past the first lease's end: only a renewed token still works
    _key_status(session)
    assert (session.logins, session.renewals) == (1, 2)
    assert session.client.token == token  # renewed, never replaced
    assert _ttl_left(session) >= 4


def test_a_token_at_its_maximum_ttl_is_replaced_by_a_fresh_login(servers: Servers, unique: str) -> None:
    session = VaultSession(_short_lived_role(servers, f"maxttl-{unique}", ttl="6s", max_ttl="8s"))
    _key_status(session)
    first = session.client.token
    time.sleep(4.5)  # renewal is capped at the 8 s maximum: 3.5 s left, enough for now
    _key_status(session)
    assert (session.logins, session.renewals, session.client.token) == (1, 1, first)
    time.sleep(2.5)  # 1 s to the maximum: renewing cannot help, so it logs in again
    _key_status(session)
    assert session.logins == 2 and session.client.token != first
    assert _ttl_left(session) >= 4


def test_a_refused_login_is_unavailable_and_never_echoes_the_secret(servers: Servers) -> None:
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token)
    wrong = "00000000-0000-0000-0000-000000000000"
    session = VaultSession(VaultAuth(addr=servers.vault_addr, role_id=creds.role_id, secret_id=wrong))
    with pytest.raises(VaultUnavailable, match=r"refused login \(InvalidRequest\)") as info:
        _key_status(session)
    assert wrong not in str(info.value) and creds.role_id not in str(info.value)


async def test_crypto_with_a_refused_approle_answers_unavailable_on_open_and_seal(
    pki: Pki, servers: Servers, tmp_path: Path, unique: str
) -> None:
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token)
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    store = tmp_path / "store"
    good = with_tls(
        crypto_config(servers.kafka_bootstrap, servers.vault_addr, creds, store, topics.prefix), pki, "crypto"
    )
    ds = dicom_samples.ct_image(study_uid=None, seed=11, rows=64, columns=64)
    data = dicom_samples.to_bytes(ds)
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, hashlib.sha256(data).hexdigest()),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
    )
    async with (
        running(lambda stop: run_crypto(good, stop), good.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(good.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        await sealer_for(crypto_pb2_grpc.CryptoServiceStub(channel), good).seal(data, meta)

    # Same store, same role, but a secret-id Vault does not know (e.g. one that expired).
    refused = dataclasses.replace(
        good,
        grpc_bind=f"127.0.0.1:{free_port()}",
        vault=dataclasses.replace(good.vault, secret_id="00000000-0000-0000-0000-000000000000"),
    )
    other = dicom_samples.ct_image(study_uid=None, seed=12, rows=64, columns=64)
    other_data = dicom_samples.to_bytes(other)
    other_meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(other.SOPInstanceUID, hashlib.sha256(other_data).hexdigest()),
        sop_instance_uid=other.SOPInstanceUID,
        study_instance_uid=other.StudyInstanceUID,
    )
    async with (
        running(lambda stop: run_crypto(refused, stop), refused.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(refused.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        for request in (
            crypto_pb2.OpenRequest(object_id=meta.object_id),
            crypto_pb2.OpenRequest(object_id=meta.object_id, offset=10, length=100),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as opened:
                _ = [p async for p in stub.Open(request)]
            assert opened.value.code() == grpc.StatusCode.UNAVAILABLE, opened.value.details()
        with pytest.raises(SealFailure) as sealed:
            await sealer_for(stub, good).seal(other_data, other_meta)
        assert sealed.value.code == grpc.StatusCode.UNAVAILABLE, sealed.value.detail
        with pytest.raises(grpc.aio.AioRpcError) as status:
            await stub.GetKeyStatus(crypto_pb2.KeyStatusRequest())
        assert status.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not list(store.rglob(f"{other_meta.object_id}*"))  # nothing written for the refused seal
