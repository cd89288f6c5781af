"""Data keys from Vault Transit: the only place the crypto service talks to Vault.

A DEK is 32 random bytes generated here and wrapped by Transit ``encrypt`` (concurrent seals
share one batch request, see ``dek_wrapper``); it is used once in memory and dropped. Only
Vault's wrapped form (``vault:vN:...``) is ever written anywhere, so opening (``decrypt``),
rewrap and rotation work on it as on any Transit ciphertext.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import hvac
import hvac.exceptions

from dicomsafe.common.vault import DEFAULT_K8S_TOKEN_PATH, VaultAuth, VaultSession, VaultUnavailable
from services.crypto.dek_wrapper import DekWrapper

log = logging.getLogger("dicomsafe.crypto.vault")

# Patients whose pseudonym is remembered (LRU): one busy day of a large hospital's patients.
ERASURE_REF_CACHE = 50_000
_WRAPPED = re.compile(r"^vault:v(\d+):[A-Za-z0-9+/=]+$")


class ObjectErased(Exception):
    """The object's per-patient erasure key is gone: it was crypto-shredded on purpose."""


class WrappedKeyRejected(Exception):
    """Vault could not unwrap a stored DEK: the header was altered or the key version retired."""


@dataclass(frozen=True)
class DataKey:
    plaintext: bytearray  # mutable so callers can zero it when done
    wrapped: str
    key_name: str
    key_version: int


@dataclass(frozen=True)
class KeyVersions:
    key_name: str
    latest: int
    min_decryption: int
    min_encryption: int


@dataclass(frozen=True)
class VaultSettings:
    addr: str
    transit_mount: str
    key_name: str
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    ca_cert: str | None = None
    timeout_s: float = 10.0
    pseudonym_key: str = "dicomsafe-pseudonym"
    # 0 disables the cache. Kept short: a retired key version or revoked token takes effect
    # on cached DEKs only after this long (a timer zeroes expired keys even when idle).
    dek_cache_ttl_s: float = 30.0
    erasure_mount: str = "dicomsafe-erasure"
    # Patients' erasure keys as read for sealing; 0 disables. Kept to seconds: another replica's
    # erasure reaches this one's seals only after this long (see the README's GDPR section).
    erasure_key_cache_ttl_s: float = 5.0
    # Kubernetes auth instead of AppRole (see dicomsafe.common.vault.VaultAuth).
    k8s_role: str | None = None
    k8s_token_path: str = DEFAULT_K8S_TOKEN_PATH
    k8s_mount: str = "kubernetes"


class KeyCache:
    """Keys in memory only, briefly, bounded; evicted entries are zeroed. Used for unwrapped DEKs
    (by key name and wrapped form) and for patients' erasure keys (by mount and pseudonymous
    reference, never by a patient identifier)."""

    def __init__(self, ttl_s: float, max_entries: int = 256) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._entries: dict[tuple[str, str], tuple[float, bytearray]] = {}
        self._lock = threading.Lock()

    def get(self, scope: str, name: str) -> bytearray | None:
        """A copy the caller zeroes, or None."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            hit = self._entries.get((scope, name))
            return bytearray(hit[1]) if hit else None

    def put(self, scope: str, name: str, key: bytearray) -> None:
        if self._ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while len(self._entries) >= self._max:
                oldest = min(self._entries, key=lambda k: self._entries[k][0])
                zero(self._entries.pop(oldest)[1])
            self._entries[(scope, name)] = (now + self._ttl, bytearray(key))

    def discard(self, scope: str, name: str) -> None:
        """Zeroes and drops one entry, if present (its key is about to stop existing)."""
        with self._lock:
            entry = self._entries.pop((scope, name), None)
            if entry is not None:
                zero(entry[1])

    def _expire(self, now: float) -> None:
        for k in [k for k, (expiry, _) in self._entries.items() if expiry <= now]:
            zero(self._entries.pop(k)[1])

    @property
    def sweep_interval_s(self) -> float:
        """How often ``sweep`` should run so no key outlives its TTL by more than a fifth."""
        return min(max(self._ttl / 5, 0.05), 5.0)

    def sweep(self) -> int:
        """Zeroes and drops expired keys; returns how many. get/put expire too, but an idle
        service calls neither, so a timer calls this."""
        with self._lock:
            before = len(self._entries)
            self._expire(time.monotonic())
            return before - len(self._entries)

    def clear(self) -> None:
        """Zeroes every key (at shutdown)."""
        with self._lock:
            for _, dek in self._entries.values():
                zero(dek)
            self._entries.clear()

    async def sweep_until(self, stop: asyncio.Event) -> None:
        """Sweeps every ``sweep_interval_s`` until ``stop`` is set, then zeroes everything."""
        try:
            while self._ttl > 0 and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.sweep_interval_s)
                self.sweep()
            await stop.wait()
        finally:
            self.clear()


def key_version_of(wrapped: str) -> int:
    match = _WRAPPED.match(wrapped)
    if not match:
        raise WrappedKeyRejected("wrapped key is not in Vault Transit format")
    return int(match.group(1))


class TransitKeys:
    """Blocking hvac calls run in worker threads so the event loop keeps serving."""

    def __init__(self, settings: VaultSettings) -> None:
        self._s = settings
        self._session = VaultSession(
            VaultAuth(
                addr=settings.addr,
                token=settings.token,
                role_id=settings.role_id,
                secret_id=settings.secret_id,
                ca_cert=settings.ca_cert,
                timeout_s=settings.timeout_s,
                k8s_role=settings.k8s_role,
                k8s_token_path=settings.k8s_token_path,
                k8s_mount=settings.k8s_mount,
            )
        )
        self._dek_cache = KeyCache(settings.dek_cache_ttl_s)
        self._erasure_cache = KeyCache(settings.erasure_key_cache_ttl_s)
        self._dek_wrapper = DekWrapper(self._wrap_batch)
        self._ref_salt = secrets.token_bytes(16)
        self._refs: OrderedDict[bytes, str] = OrderedDict()

    @property
    def key_name(self) -> str:
        return self._s.key_name

    @property
    def dek_cache(self) -> KeyCache:
        return self._dek_cache

    @property
    def erasure_cache(self) -> KeyCache:
        return self._erasure_cache

    @property
    def dek_wrapper(self) -> DekWrapper:
        return self._dek_wrapper

    async def sweep_caches_until(self, stop: asyncio.Event) -> None:
        """Zeroes expired keys of both caches on a timer until ``stop``, then every cached key."""
        await asyncio.gather(self._dek_cache.sweep_until(stop), self._erasure_cache.sweep_until(stop))

    def _call(
        self, fn_name: str, *, expected: tuple[type[hvac.exceptions.VaultError], ...] = (), **kwargs: object
    ) -> dict[str, object]:
        mount = self._s.transit_mount
        return self._session.call(
            fn_name, lambda c: getattr(c.secrets.transit, fn_name)(mount_point=mount, **kwargs), expected=expected
        )

    # -- per-patient erasure keys -------------------------------------------------------------

    def _erasure_ref(self, issuer: str, patient_id: str) -> str:
        # Keyed pseudonym: without Vault nobody can map a reference back to a patient, and
        # the same patient always gets the same reference (key version pinned to 1).
        message = base64.b64encode(f"{issuer}\x00{patient_id}".encode()).decode()
        data = self._call(
            "generate_hmac", name=self._s.pseudonym_key, hash_input=message, key_version=1, algorithm="sha2-256"
        )
        digest = base64.b64decode(str(data["hmac"]).split(":", 2)[2])
        return digest[:16].hex()

    def _read_erasure_key(self, ref: str) -> bytearray | None:
        mount = self._s.erasure_mount
        try:
            data = self._session.call(
                "erasure key read",
                lambda c: c.secrets.kv.v2.read_secret_version(ref, mount_point=mount, raise_on_deleted_version=True),
                expected=(hvac.exceptions.InvalidPath,),
            )
        except hvac.exceptions.InvalidPath:
            return None  # never created, or destroyed by an erasure
        return bytearray(base64.b64decode(str(dict(data["data"])["key"])))  # type: ignore[call-overload]

    def _erasure_key(self, ref: str) -> bytearray:
        existing = self._read_erasure_key(ref)
        if existing is not None:
            return existing
        fresh = base64.b64encode(os.urandom(32)).decode()
        mount = self._s.erasure_mount
        # cas=0: create only; the service's policy cannot overwrite an existing key. If another
        # replica created it first this fails, and we read theirs below.
        with contextlib.suppress(hvac.exceptions.InvalidRequest, VaultUnavailable):
            self._session.call(
                "erasure key create",
                lambda c: c.secrets.kv.v2.create_or_update_secret(ref, secret={"key": fresh}, cas=0, mount_point=mount),
                expected=(hvac.exceptions.InvalidRequest,),
            )
        created = self._read_erasure_key(ref)
        if created is None:
            raise VaultUnavailable("erasure key could not be created")
        return created

    def _destroy_erasure_key(self, ref: str) -> None:
        mount = self._s.erasure_mount
        self._session.call(
            "erasure key destroy",
            lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(ref, mount_point=mount),
        )

    async def destroy_erasure_key(self, ref: str) -> None:
        """Crypto-shred: every object sealed with this patient's key becomes unreadable.
        Needs the erasure officer's identity; the crypto service's own policy refuses it."""
        # Forgotten first: nothing here may seal under the key once it is being destroyed.
        self._erasure_cache.discard(self._s.erasure_mount, ref)
        await asyncio.to_thread(self._destroy_erasure_key, ref)

    async def erasure_ref(self, issuer: str, patient_id: str) -> str:
        """The patient's keyed pseudonym. Deterministic (HMAC key version pinned), so remembering it
        is safe and saves a Vault round trip for every further instance of the patient; the cache is
        keyed by a salted hash, so no patient identifier stays in memory."""
        handle = hashlib.sha256(self._ref_salt + f"{issuer}\x00{patient_id}".encode()).digest()
        ref = self._refs.get(handle)
        if ref is None:
            ref = await asyncio.to_thread(self._erasure_ref, issuer, patient_id)
            self._refs[handle] = ref
            if len(self._refs) > ERASURE_REF_CACHE:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(handle)
        return ref

    async def erasure_key_for_seal(self, ref: str) -> bytearray:
        """The patient's erasure key (a copy the caller zeroes), created on first use. Kept for
        ``erasure_key_cache_ttl_s``: a study's instances arrive together, one Vault read serves them."""
        mount = self._s.erasure_mount
        cached = self._erasure_cache.get(mount, ref)
        if cached is not None:
            return cached
        key = await asyncio.to_thread(self._erasure_key, ref)
        self._erasure_cache.put(mount, ref, key)
        return key

    async def erasure_key_for_open(self, ref: str) -> bytearray:
        # Always from Vault, never cached: an erased patient's objects stop opening at once.
        key = await asyncio.to_thread(self._read_erasure_key, ref)
        if key is None:
            raise ObjectErased("the patient's erasure key was destroyed")
        return key

    def _wrap_batch(self, plaintexts_b64: list[str]) -> list[dict[str, object]]:
        """One Transit ``encrypt`` request for many keys; ``batch_results`` in the same order."""
        path = f"/v1/{self._s.transit_mount}/encrypt/{self._s.key_name}"
        body = {
            "batch_input": [{"plaintext": p} for p in plaintexts_b64],
            # Some items refused, others wrapped: answer 200 and say which, item by item, instead
            # of a 400 that would fail the whole batch. (Every item refused is still a 400.)
            "partial_failure_response_code": 200,
        }
        data = self._session.call("data key wrap", lambda c: c.adapter.post(path, json=body))
        results = data.get("batch_results")
        if not isinstance(results, list):
            raise VaultUnavailable("Vault answered a data key batch without batch_results")
        return [dict(item) if isinstance(item, dict) else {} for item in results]

    def _unwrap(self, key_name: str, wrapped: str) -> bytearray:
        key_version_of(wrapped)
        try:
            data = self._call(
                "decrypt_data", name=key_name, ciphertext=wrapped, expected=(hvac.exceptions.InvalidRequest,)
            )
        except hvac.exceptions.InvalidRequest:
            # Vault answers 400 when the wrapped key fails authentication or its version
            # is below min_decryption_version: the object cannot be opened as it is.
            raise WrappedKeyRejected("Vault rejected the wrapped data key") from None
        return bytearray(base64.b64decode(str(data["plaintext"])))

    def _rewrap(self, wrapped: str) -> str:
        key_version_of(wrapped)
        try:
            data = self._call(
                "rewrap_data", name=self._s.key_name, ciphertext=wrapped, expected=(hvac.exceptions.InvalidRequest,)
            )
        except hvac.exceptions.InvalidRequest:
            raise WrappedKeyRejected("Vault rejected the wrapped data key") from None
        return str(data["ciphertext"])

    def _status(self) -> KeyVersions:
        data = self._call("read_key", name=self._s.key_name)
        return KeyVersions(
            key_name=self._s.key_name,
            latest=int(str(data["latest_version"])),
            min_decryption=int(str(data["min_decryption_version"])),
            min_encryption=int(str(data.get("min_encryption_version", 0))),
        )

    def _rotate(self) -> KeyVersions:
        self._call("rotate_key", name=self._s.key_name)
        return self._status()

    async def rewrap(self, wrapped: str) -> str:
        """Re-encrypt a wrapped DEK under the latest key version; the DEK itself never leaves Vault."""
        return await asyncio.to_thread(self._rewrap, wrapped)

    async def status(self) -> KeyVersions:
        return await asyncio.to_thread(self._status)

    async def rotate(self) -> KeyVersions:
        return await asyncio.to_thread(self._rotate)

    async def new_data_key(self) -> DataKey:
        """A fresh DEK (the caller zeroes ``plaintext``) and its wrapped form."""
        plaintext = bytearray(secrets.token_bytes(32))
        try:
            wrapped = await self._dek_wrapper.wrap(base64.b64encode(plaintext).decode("ascii"))
            version = key_version_of(wrapped)
        except WrappedKeyRejected:
            zero(plaintext)
            raise VaultUnavailable("Vault answered a data key wrap in an unexpected format") from None
        except BaseException:
            zero(plaintext)
            raise
        return DataKey(plaintext, wrapped, self._s.key_name, version)

    async def unwrap(self, key_name: str, wrapped: str) -> bytearray:
        """The plaintext DEK (a copy the caller zeroes). Recently unwrapped DEKs are kept in
        memory for a few seconds so a viewer's burst of range reads costs one Vault call."""
        cached = self._dek_cache.get(key_name, wrapped)
        if cached is not None:
            return cached
        dek = await asyncio.to_thread(self._unwrap, key_name, wrapped)
        self._dek_cache.put(key_name, wrapped, dek)
        return dek


def zero(buf: bytearray) -> None:
    """Best effort: Python may hold other copies, but this one stops lingering."""
    buf[:] = bytes(len(buf))
