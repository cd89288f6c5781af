"""The grants a check needs, from memory: a MongoDB read per check cost more than the rest of
the decision (the bench's ``grants`` mode ran at a quarter of the transport's rate).

Correctness rests on the store's generation counter, not on a time-to-live:
- a background poller reads the counter every ``poll_s``; any change empties the cache, so a
  revocation or a new grant made on any replica is seen on every replica within ``poll_s``
  (and at once on the replica that made it: its own changes empty its cache directly);
- the cache answers only while the poller has confirmed the counter within the last
  ``2 * poll_s + margin``: MongoDB unreachable, or the poller stalled, means every check reads
  the store again (and fails closed if that fails too), never that a stale entry lives on;
- an entry read while a change landed is not kept (an epoch, bumped by every emptying, must be
  the same before and after the read);
- windows are judged at each check: an entry holds every grant that had not ended when it was
  read (not yet started ones included), and a grant that ends meanwhile is dropped at use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time

from services.authz.grants import GrantStore, StoredGrant

log = logging.getLogger("dicomsafe.authz.grants")

MAX_ENTRIES = 50_000
_CONFIRM_MARGIN_S = 0.2


class GrantCache:
    def __init__(self, store: GrantStore, poll_s: float) -> None:
        self.store = store
        self._poll_s = poll_s
        self._entries: dict[tuple[str, frozenset[str]], list[StoredGrant]] = {}
        self._epoch = 0
        self._generation: int | None = None
        self._confirmed_at = float("-inf")
        store.on_change.append(self.invalidate)

    @property
    def enabled(self) -> bool:
        return self._poll_s > 0

    def _fresh(self) -> bool:
        return time.monotonic() - self._confirmed_at <= 2 * self._poll_s + _CONFIRM_MARGIN_S

    def invalidate(self) -> None:
        self._entries.clear()
        self._epoch += 1

    async def active(self, subject: str, now: dt.datetime, roles: frozenset[str] = frozenset()) -> list[StoredGrant]:
        """``GrantStore.active``, answered from memory while the generation is confirmed."""
        if not self.enabled or not self._fresh():
            return await self.store.active(subject, now, roles)
        key = (subject, roles)
        cached = self._entries.get(key)
        if cached is None:
            epoch = self._epoch
            cached = await self.store.active(subject, now, roles)
            if epoch == self._epoch and self._fresh():
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key] = cached
        return [g for g in cached if not g.ended(now)]

    async def poll_once(self) -> None:
        try:
            generation = await self.store.generation()
        except Exception as exc:  # noqa: BLE001 - MongoDB down: stop answering from memory
            self.invalidate()
            self._confirmed_at = float("-inf")
            log.warning("grant generation unreadable; checks read the store", extra={"error": type(exc).__name__})
            return
        if generation != self._generation:
            self.invalidate()
            self._generation = generation
        self._confirmed_at = time.monotonic()

    async def keep(self, stop: asyncio.Event) -> None:
        """The poller: runs until ``stop``."""
        if not self.enabled:
            return
        while not stop.is_set():
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._poll_s)
