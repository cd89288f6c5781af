from __future__ import annotations

import time

from services.crypto.vault_keys import DekCache


def test_hit_returns_a_copy_the_caller_may_zero() -> None:
    cache = DekCache(ttl_s=60)
    cache.put("k", "vault:v1:abc", bytearray(b"\x01" * 32))
    first = cache.get("k", "vault:v1:abc")
    assert first == bytearray(b"\x01" * 32)
    assert first is not None
    first[:] = bytes(32)
    assert cache.get("k", "vault:v1:abc") == bytearray(b"\x01" * 32)
    assert cache.get("k", "vault:v2:abc") is None
    assert cache.get("other", "vault:v1:abc") is None


def test_entries_expire_and_are_zeroed() -> None:
    cache = DekCache(ttl_s=0.05)
    dek = bytearray(b"\x07" * 32)
    cache.put("k", "w", dek)
    stored = cache._entries[("k", "w")][1]
    time.sleep(0.1)
    assert cache.get("k", "w") is None
    assert stored == bytearray(32)  # the evicted copy was wiped, not just dropped


def test_bounded_and_disabled() -> None:
    cache = DekCache(ttl_s=60, max_entries=3)
    for i in range(5):
        cache.put("k", f"w{i}", bytearray([i]) * 32)
    assert len(cache._entries) == 3
    assert cache.get("k", "w4") is not None and cache.get("k", "w0") is None
    off = DekCache(ttl_s=0)
    off.put("k", "w", bytearray(32))
    assert off.get("k", "w") is None
