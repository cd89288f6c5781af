from __future__ import annotations

import asyncio
import time

from services.crypto.vault_keys import KeyCache


def test_hit_returns_a_copy_the_caller_may_zero() -> None:
    cache = KeyCache(ttl_s=60)
    cache.put("k", "vault:v1:abc", bytearray(b"\x01" * 32))
    first = cache.get("k", "vault:v1:abc")
    assert first == bytearray(b"\x01" * 32)
    assert first is not None
    first[:] = bytes(32)
    assert cache.get("k", "vault:v1:abc") == bytearray(b"\x01" * 32)
    assert cache.get("k", "vault:v2:abc") is None
    assert cache.get("other", "vault:v1:abc") is None


def test_entries_expire_and_are_zeroed() -> None:
    cache = KeyCache(ttl_s=0.05)
    dek = bytearray(b"\x07" * 32)
    cache.put("k", "w", dek)
    stored = cache._entries[("k", "w")][1]
    time.sleep(0.1)
    assert cache.get("k", "w") is None
    assert stored == bytearray(32)  # the evicted copy was wiped, not just dropped


def test_bounded_and_disabled() -> None:
    cache = KeyCache(ttl_s=60, max_entries=3)
    for i in range(5):
        cache.put("k", f"w{i}", bytearray([i]) * 32)
    assert len(cache._entries) == 3
    assert cache.get("k", "w4") is not None and cache.get("k", "w0") is None
    off = KeyCache(ttl_s=0)
    off.put("k", "w", bytearray(32))
    assert off.get("k", "w") is None


def test_sweep_zeroes_expired_keys_without_any_get_or_put() -> None:
    cache = KeyCache(ttl_s=0.05)
    cache.put("k", "old", bytearray(b"\x03" * 32))
    old = cache._entries[("k", "old")][1]
    time.sleep(0.1)
    assert old == bytearray(b"\x03" * 32)  # nothing has looked at the cache since
    assert cache.sweep() == 1
    assert old == bytearray(32) and not cache._entries
    assert cache.sweep() == 0


async def test_the_sweeper_runs_while_idle_and_zeroes_everything_at_shutdown() -> None:
    cache = KeyCache(ttl_s=0.1)
    stop = asyncio.Event()
    sweeper = asyncio.create_task(cache.sweep_until(stop))
    cache.put("k", "short", bytearray(b"\x05" * 32))
    short = cache._entries[("k", "short")][1]
    await asyncio.sleep(0.3)  # idle: nothing calls get or put
    assert short == bytearray(32) and not cache._entries
    cache.put("k", "live", bytearray(b"\x06" * 32))
    live = cache._entries[("k", "live")][1]
    stop.set()
    await asyncio.wait_for(sweeper, 5)
    assert live == bytearray(32) and not cache._entries  # not yet expired, zeroed at shutdown


async def test_a_disabled_cache_has_an_idle_sweeper_that_stops() -> None:
    cache = KeyCache(ttl_s=0)
    stop = asyncio.Event()
    sweeper = asyncio.create_task(cache.sweep_until(stop))
    await asyncio.sleep(0.05)
    assert not sweeper.done()
    stop.set()
    await asyncio.wait_for(sweeper, 5)


def test_discard_zeroes_and_drops_one_entry() -> None:
    cache = KeyCache(ttl_s=60)
    cache.put("erasure", "ref-a", bytearray(b"\x08" * 32))
    cache.put("erasure", "ref-b", bytearray(b"\x09" * 32))
    stored = cache._entries[("erasure", "ref-a")][1]
    cache.discard("erasure", "ref-a")
    assert stored == bytearray(32)
    assert cache.get("erasure", "ref-a") is None
    assert cache.get("erasure", "ref-b") == bytearray(b"\x09" * 32)
    cache.discard("erasure", "never-cached")  # nothing to drop: no error
