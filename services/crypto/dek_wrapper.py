"""Wrapping locally generated data keys with Vault Transit ``encrypt``, many keys per request.

Concurrent seals share Vault round trips (natural batching, dicomsafe.common.batching): while
one wrap request is in flight, new requests queue and go out together in the next one; a lone
request goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from dicomsafe.common.batching import NaturalBatcher
from dicomsafe.common.vault import VaultUnavailable

log = logging.getLogger("dicomsafe.crypto.vault")

# Blocking: base64 plaintexts in, Transit's ``batch_results`` (one item each, in order) out.
WrapBatch = Callable[[list[str]], Sequence[Mapping[str, object]]]

# Enough to absorb a burst of concurrent seals; small enough that one request stays a few KiB.
DEFAULT_MAX_BATCH = 64


class DekWrapper:
    """One wrap request in flight at a time (dicomsafe.common.batching); the blocking call runs
    in a worker thread.

    Sees only base64 plaintexts (immutable strings the caller cannot zero, which is why the
    caller keeps the bytearray it zeroes). Nothing about a key reaches a log or an exception.
    """

    def __init__(self, send: WrapBatch, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._send = send
        self._batcher: NaturalBatcher[str, str] = NaturalBatcher(self._wrap_batch, _failure, max_batch)

    @property
    def calls(self) -> int:
        """Vault requests made: what batching saves, for operators and tests."""
        return self._batcher.calls

    @property
    def keys(self) -> int:
        """Keys those requests wrapped."""
        return self._batcher.items

    async def wrap(self, plaintext_b64: str) -> str:
        """The wrapped form (``vault:vN:...``) of one key; VaultUnavailable if Vault did not wrap it."""
        return await self._batcher.submit(plaintext_b64)

    async def _wrap_batch(self, plaintexts: list[str]) -> list[str | BaseException]:
        try:
            results = await asyncio.to_thread(self._send, plaintexts)
        except VaultUnavailable as exc:
            return [VaultUnavailable(str(exc)) for _ in plaintexts]
        except Exception as exc:  # noqa: BLE001 - fail closed, every key of the request
            # Not an answer Vault's mapping knows (e.g. a response of the wrong shape), naming only
            # the exception's type.
            log.error("data key wrap request failed", extra={"error": type(exc).__name__, "keys": len(plaintexts)})
            return [VaultUnavailable(f"data key wrap failed ({type(exc).__name__})") for _ in plaintexts]
        if len(results) != len(plaintexts):
            return [
                VaultUnavailable("Vault answered a data key batch with the wrong number of results") for _ in plaintexts
            ]
        out: list[str | BaseException] = []
        for item in results:
            ciphertext = item.get("ciphertext")
            if item.get("error") or not isinstance(ciphertext, str) or not ciphertext:
                # Vault's per-item error text is left out: it may quote what it was sent.
                out.append(VaultUnavailable("Vault refused to wrap a data key"))
            else:
                out.append(ciphertext)
        if refused := sum(isinstance(r, BaseException) for r in out):
            log.warning("Vault refused to wrap data keys", extra={"refused": refused, "keys": len(plaintexts)})
        return out


def _failure(cause: BaseException | None) -> BaseException:
    if cause is None:
        return VaultUnavailable("data key request interrupted")
    return VaultUnavailable(f"data key wrap failed ({type(cause).__name__})")
