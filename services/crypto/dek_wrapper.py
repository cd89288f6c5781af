"""Wrapping locally generated data keys with Vault Transit ``encrypt``, many keys per request.

Concurrent seals share Vault round trips ("natural batching"): while one wrap request is in
flight, new requests queue; when it returns, the queued ones (up to ``max_batch``) go out
together in the next request. A lone request goes out at once: no timer holds a key back, so
batching costs latency nothing and saves the most exactly when seals pile up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from dicomsafe.common.vault import VaultUnavailable

log = logging.getLogger("dicomsafe.crypto.vault")

# Blocking: base64 plaintexts in, Transit's ``batch_results`` (one item each, in order) out.
WrapBatch = Callable[[list[str]], Sequence[Mapping[str, object]]]

# Enough to absorb a burst of concurrent seals; small enough that one request stays a few KiB.
DEFAULT_MAX_BATCH = 64


class DekWrapper:
    """One wrap request in flight at a time; the blocking call runs in a worker thread.

    Sees only base64 plaintexts (immutable strings the caller cannot zero, which is why the
    caller keeps the bytearray it zeroes). Nothing about a key reaches a log or an exception.
    """

    def __init__(self, send: WrapBatch, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._send = send
        self._max = max_batch
        self._queue: deque[tuple[str, asyncio.Future[str]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        # Vault requests made and keys they wrapped: what batching saves, for operators and tests.
        self.calls = 0
        self.keys = 0

    async def wrap(self, plaintext_b64: str) -> str:
        """The wrapped form (``vault:vN:...``) of one key; VaultUnavailable if Vault did not wrap it."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        self._queue.append((plaintext_b64, waiter))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await waiter

    async def _drain(self) -> None:
        batch: list[tuple[str, asyncio.Future[str]]] = []
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
                # A seal cancelled while it waited needs no key.
                batch = [(p, w) for p, w in batch if not w.done()]
                if batch:
                    await self._wrap_batch(batch)
                batch = []
        except BaseException:
            # Cancelled with the loop: nobody may be left waiting for an answer that never comes.
            for _, waiter in [*batch, *self._queue]:
                _fail(waiter, VaultUnavailable("data key request interrupted"))
            self._queue.clear()
            raise
        finally:
            self._drainer = None

    async def _wrap_batch(self, batch: list[tuple[str, asyncio.Future[str]]]) -> None:
        self.calls += 1
        self.keys += len(batch)
        try:
            results = await asyncio.to_thread(self._send, [p for p, _ in batch])
        except VaultUnavailable as exc:
            for _, waiter in batch:
                _fail(waiter, VaultUnavailable(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a waiter left unanswered would hang its seal
            # Not an answer Vault's mapping knows (e.g. a response of the wrong shape): still fail
            # closed, every waiter at once, naming only the exception's type.
            log.error("data key wrap request failed", extra={"error": type(exc).__name__, "keys": len(batch)})
            for _, waiter in batch:
                _fail(waiter, VaultUnavailable(f"data key wrap failed ({type(exc).__name__})"))
            return
        if len(results) != len(batch):
            for _, waiter in batch:
                _fail(waiter, VaultUnavailable("Vault answered a data key batch with the wrong number of results"))
            return
        refused = 0
        for (_, waiter), item in zip(batch, results, strict=True):
            ciphertext = item.get("ciphertext")
            if item.get("error") or not isinstance(ciphertext, str) or not ciphertext:
                # Vault's per-item error text is left out: it may quote what it was sent.
                refused += 1
                _fail(waiter, VaultUnavailable("Vault refused to wrap a data key"))
            elif not waiter.done():
                waiter.set_result(ciphertext)
        if refused:
            log.warning("Vault refused to wrap data keys", extra={"refused": refused, "keys": len(batch)})


def _fail(waiter: asyncio.Future[str], exc: VaultUnavailable) -> None:
    # Each waiter gets its own exception: one shared instance would collect every raiser's traceback.
    if not waiter.done():
        waiter.set_exception(exc)
