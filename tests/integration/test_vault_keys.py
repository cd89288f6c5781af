"""The crypto service's Vault client on a real OpenBao: data keys generated here and wrapped in
shared Transit ``encrypt`` batches, and the short-lived cache of patients' erasure keys."""

from __future__ import annotations

import asyncio
import base64
import secrets

import hvac
import pytest

from dicomsafe.common.vault import VaultUnavailable
from services.crypto.dek_wrapper import DEFAULT_MAX_BATCH
from services.crypto.vault_keys import ObjectErased, TransitKeys, VaultSettings
from tests.servers import Servers
from tools import vault_setup
from tools.ports import free_port

ERASURE_MOUNT = "dicomsafe-erasure"


@pytest.fixture
def creds(servers: Servers) -> vault_setup.AppRoleCredentials:
    return vault_setup.provision(servers.vault_addr, servers.vault_token)


def _crypto_keys(servers: Servers, creds: vault_setup.AppRoleCredentials) -> TransitKeys:
    """The crypto service's own identity; no DEK cache, so every unwrap asks Vault."""
    return TransitKeys(
        VaultSettings(
            addr=servers.vault_addr,
            transit_mount="transit",
            key_name="dicomsafe-dek",
            role_id=creds.role_id,
            secret_id=creds.secret_id,
            dek_cache_ttl_s=0,
        )
    )


async def test_concurrent_data_keys_share_wrap_requests_and_each_unwraps_to_itself(
    servers: Servers, creds: vault_setup.AppRoleCredentials
) -> None:
    keys = _crypto_keys(servers, creds)
    lone = await keys.new_data_key()  # nothing else waiting: one request for one key
    assert (keys.dek_wrapper.calls, keys.dek_wrapper.keys) == (1, 1)

    n = 150
    batch = await asyncio.gather(*(keys.new_data_key() for _ in range(n)))
    calls = keys.dek_wrapper.calls - 1
    assert keys.dek_wrapper.keys - 1 == n
    assert -(-n // DEFAULT_MAX_BATCH) <= calls < n  # shared requests, never more than the cap each

    every = [lone, *batch]
    assert all(len(k.plaintext) == 32 for k in every)
    assert len({bytes(k.plaintext) for k in every}) == n + 1  # every DEK fresh
    assert len({k.wrapped for k in every}) == n + 1
    latest = (await keys.status()).latest
    assert {(k.key_name, k.key_version) for k in every} == {("dicomsafe-dek", latest)}
    for k in every:
        assert k.wrapped.startswith(f"vault:v{latest}:")
        assert await keys.unwrap(k.key_name, k.wrapped) == k.plaintext  # Transit decrypt gives it back


async def test_a_refused_item_fails_only_its_own_waiter(
    servers: Servers, creds: vault_setup.AppRoleCredentials
) -> None:
    keys = _crypto_keys(servers, creds)
    good = [base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2)]
    # Not base64: Transit refuses this item and wraps its neighbours in the same request.
    results = await asyncio.gather(
        keys.dek_wrapper.wrap(good[0]),
        keys.dek_wrapper.wrap("not base64!"),
        keys.dek_wrapper.wrap(good[1]),
        return_exceptions=True,
    )
    assert keys.dek_wrapper.calls == 1
    wrapped_a, refused, wrapped_b = results
    assert isinstance(refused, VaultUnavailable)
    assert "base64" not in str(refused)  # Vault's item error text is not passed on
    assert isinstance(wrapped_a, str) and isinstance(wrapped_b, str)
    for plaintext, wrapped in ((good[0], wrapped_a), (good[1], wrapped_b)):
        assert bytes(await keys.unwrap("dicomsafe-dek", wrapped)) == base64.b64decode(plaintext)

    # A batch of nothing but refused items is refused as a whole (Vault answers 400): the same
    # outcome for its waiter, and the wrapper keeps serving afterwards.
    with pytest.raises(VaultUnavailable):
        await keys.dek_wrapper.wrap("still not base64!")
    assert (await keys.new_data_key()).key_name == "dicomsafe-dek"


async def test_vault_down_fails_every_waiter_of_the_batch(creds: vault_setup.AppRoleCredentials) -> None:
    keys = TransitKeys(
        VaultSettings(
            addr=f"http://127.0.0.1:{free_port()}",  # nothing listens there
            transit_mount="transit",
            key_name="dicomsafe-dek",
            role_id=creds.role_id,
            secret_id=creds.secret_id,
            timeout_s=2.0,
        )
    )
    results = await asyncio.gather(*(keys.new_data_key() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, VaultUnavailable) for r in results), results
    assert keys.dek_wrapper.calls < 10
    assert len({id(r) for r in results}) == 10  # each waiter its own exception


async def test_a_cancelled_seal_leaves_the_other_waiters_served(
    servers: Servers, creds: vault_setup.AppRoleCredentials
) -> None:
    keys = _crypto_keys(servers, creds)
    tasks = [asyncio.create_task(keys.new_data_key()) for _ in range(5)]
    await asyncio.sleep(0)  # every task has queued its key
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert keys.dek_wrapper.keys == 4  # the cancelled seal's key was never sent
    assert isinstance(done[2], asyncio.CancelledError)
    served = [d for i, d in enumerate(done) if i != 2]
    for k in served:
        assert not isinstance(k, BaseException)
        assert await keys.unwrap(k.key_name, k.wrapped) == k.plaintext
    assert (await keys.new_data_key()).key_name == "dicomsafe-dek"  # the wrapper still serves


# -- erasure keys -------------------------------------------------------------------------------


def _admin_keys(servers: Servers, ttl_s: float) -> TransitKeys:
    # An identity that may both read and destroy erasure keys, as no deployed one can: the cache
    # of the replica that destroys a key is what is under test.
    return TransitKeys(
        VaultSettings(
            addr=servers.vault_addr,
            transit_mount="transit",
            key_name="dicomsafe-dek",
            token=servers.vault_token,
            erasure_key_cache_ttl_s=ttl_s,
        )
    )


def _destroy_elsewhere(servers: Servers, ref: str) -> None:
    """Another process's erasure (the erasure tool): nothing in this process hears of it."""
    admin = hvac.Client(url=servers.vault_addr, token=servers.vault_token)
    admin.secrets.kv.v2.delete_metadata_and_all_versions(ref, mount_point=ERASURE_MOUNT)


async def test_seals_reuse_a_patients_erasure_key_until_it_expires(servers: Servers) -> None:
    vault_setup.provision(servers.vault_addr, servers.vault_token)
    keys = _admin_keys(servers, ttl_s=0.3)
    ref = secrets.token_hex(16)
    first = await keys.erasure_key_for_seal(ref)
    assert len(first) == 32
    assert keys.erasure_cache.get(ERASURE_MOUNT, ref) == first

    _destroy_elsewhere(servers, ref)
    # A hit: Vault was not asked, or it would have created a new key for the patient.
    again = await keys.erasure_key_for_seal(ref)
    assert again == first
    again[:] = bytes(32)  # the caller zeroes its copy; the cached key is unaffected
    # Opening never uses the cache: an erased patient's objects stop opening at once.
    with pytest.raises(ObjectErased):
        await keys.erasure_key_for_open(ref)

    await asyncio.sleep(0.5)  # past the TTL
    assert keys.erasure_cache.sweep() == 1  # expired, zeroed
    fresh = await keys.erasure_key_for_seal(ref)
    assert fresh != first  # read from Vault again: the destroyed key is gone, a new one made
    assert await keys.erasure_key_for_open(ref) == fresh


async def test_destroying_a_key_drops_it_from_this_replicas_cache_first(servers: Servers) -> None:
    vault_setup.provision(servers.vault_addr, servers.vault_token)
    keys = _admin_keys(servers, ttl_s=60)
    ref = secrets.token_hex(16)
    first = await keys.erasure_key_for_seal(ref)
    await keys.destroy_erasure_key(ref)
    assert keys.erasure_cache.get(ERASURE_MOUNT, ref) is None
    with pytest.raises(ObjectErased):
        await keys.erasure_key_for_open(ref)
    assert await keys.erasure_key_for_seal(ref) != first  # never sealed under the destroyed key


async def test_ttl_zero_reads_the_erasure_key_for_every_seal(servers: Servers) -> None:
    vault_setup.provision(servers.vault_addr, servers.vault_token)
    keys = _admin_keys(servers, ttl_s=0)
    ref = secrets.token_hex(16)
    first = await keys.erasure_key_for_seal(ref)
    assert keys.erasure_cache.get(ERASURE_MOUNT, ref) is None
    _destroy_elsewhere(servers, ref)
    assert await keys.erasure_key_for_seal(ref) != first
