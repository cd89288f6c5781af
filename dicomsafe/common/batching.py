"""Natural batching: concurrent callers share one round trip, and no caller waits for a timer.

While one batch request is in flight, new items queue; when it returns, the queued ones (up to
``max_batch``) go out together in the next request. A lone item goes out at once, so batching
costs latency nothing and saves the most exactly when requests pile up (a study's instances
arriving together). Used for Vault Transit wraps in crypto and for seal keys in the sealers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Per item, its result or the exception its caller gets; in the order of the items sent.
SendBatch = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class NaturalBatcher(Generic[T, R]):
    """One batch request in flight at a time.

    ``failure`` turns what went wrong with a whole request (an exception from ``send``, the
    wrong number of answers, the drainer cancelled) into the exception each of its callers gets:
    a fresh one per caller, since one shared instance would collect every raiser's traceback.
    """

    def __init__(
        self, send: SendBatch[T, R], failure: Callable[[BaseException | None], BaseException], max_batch: int
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._send = send
        self._failure = failure
        self._max = max_batch
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        # Requests made and items they carried: what batching saves, for operators and tests.
        self.calls = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, waiter))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await waiter

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
                # A caller cancelled while it waited needs no answer.
                batch = [(item, w) for item, w in batch if not w.done()]
                if batch:
                    await self._run(batch)
                batch = []
        except BaseException:
            # Cancelled with the loop: nobody may be left waiting for an answer that never comes.
            for _, waiter in [*batch, *self._queue]:
                self._fail(waiter, None)
            self._queue.clear()
            raise
        finally:
            self._drainer = None

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.calls += 1
        self.items += len(batch)
        try:
            results = await self._send([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - a waiter left unanswered would hang its caller
            for _, waiter in batch:
                self._fail(waiter, exc)
            return
        if len(results) != len(batch):
            for _, waiter in batch:
                self._fail(waiter, ValueError(f"{len(results)} answers for {len(batch)} items"))
            return
        for (_, waiter), result in zip(batch, results, strict=True):
            if waiter.done():
                continue
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    def _fail(self, waiter: asyncio.Future[R], cause: BaseException | None) -> None:
        if not waiter.done():
            waiter.set_exception(self._failure(cause))
