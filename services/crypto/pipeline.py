"""Sealing a stream while it arrives: the gRPC side and the hashing, AES-GCM and file I/O overlap.

gRPC receives messages on the event loop. SHA-256 and file writes release the GIL, so doing
them in a worker thread while the loop receives the next messages puts the second core to
work; AES-GCM (cryptography) keeps the GIL, so more threads would not help it. A thread
hand-off (futex wake-up, then the loop's self-pipe) costs about as much as sealing a small
piece, so pieces go to the worker in batches of about ``BATCH_BYTES``, with exactly one batch
in flight: chunks stay in order, and memory stays at two batches whatever the object size.
The steps run on a small pool of their own: each thread that allocates gets a malloc arena
of its own, and the default pool's many threads each kept freed chunks (measured: peak RSS
+50 MiB).

Open stays on the event loop: its work is AES-GCM decryption (GIL held) and reads from the
page cache, so a worker would add hand-offs without adding parallelism (measured).
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import Executor

from services.crypto.object_store import PendingObject
from services.crypto.sealed_format import SealWriter

BATCH_BYTES = 1024 * 1024
# fdatasync in the background every this many bytes, so the device writes while the stream
# is still arriving and the final fsync only has the tail left.
BACKGROUND_SYNC_BYTES = 4 * 1024 * 1024


class SealSink:
    """Plaintext pieces in, sealed chunks out to a pending object, hashed on the way."""

    def __init__(self, writer: SealWriter, pending: PendingObject, executor: Executor) -> None:
        self._writer = writer
        self._executor = executor
        self._pending = pending
        self._hash = hashlib.sha256()
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._in_flight: asyncio.Future[None] | None = None
        self._syncing: asyncio.Future[None] | None = None
        self._synced_at = 0
        self.plaintext_size = 0
        pending.write(writer.header_bytes())

    def _step(self, batch: list[bytes]) -> None:
        for data in batch:
            self._hash.update(data)
            self._pending.write(self._writer.update(data))

    async def _submit(self) -> None:
        if self._in_flight is not None:
            await self._in_flight
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._in_flight = self._loop.run_in_executor(self._executor, self._step, batch)
        if self._pending.size - self._synced_at >= BACKGROUND_SYNC_BYTES and (
            self._syncing is None or self._syncing.done()
        ):
            if self._syncing is not None:
                await self._syncing  # surfaces a failed flush now rather than at the end
            self._synced_at = self._pending.size
            self._syncing = self._loop.run_in_executor(None, self._pending.sync_data)

    async def feed(self, data: bytes) -> None:
        """Take one piece (kept by reference: bytes are immutable)."""
        self.plaintext_size += len(data)
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES:
            await self._submit()

    async def finish(self) -> str:
        """Seal the final chunk once every piece is written; the plaintext's SHA-256 (hex)."""
        if self._batch:
            await self._submit()
        for work in (self._in_flight, self._syncing):
            if work is not None:
                await work
        self._in_flight = self._syncing = None
        self._pending.write(self._writer.finalize())
        return self._hash.hexdigest()

    async def settle(self) -> None:
        """Wait for worker steps still running, ignoring their outcome: before an abort
        closes the file under them."""
        self._batch = []
        running = [w for w in (self._in_flight, self._syncing) if w is not None]
        if running:
            await asyncio.wait(running)
            for work in running:
                if not work.cancelled():
                    work.exception()  # retrieved: the caller is already failing the seal
