"""Natural batching (dicomsafe.common.batching): concurrent callers share a request, a lone one
goes at once, and every caller gets an answer of its own, whatever goes wrong."""

from __future__ import annotations

import asyncio

import pytest

from dicomsafe.common.batching import NaturalBatcher


class Refused(Exception):
    pass


def _failure(cause: BaseException | None) -> BaseException:
    return Refused(f"batch failed ({type(cause).__name__})" if cause else "interrupted")


async def test_a_lone_item_goes_at_once_and_concurrent_ones_share_a_request() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int | BaseException]:
        sent.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    batcher: NaturalBatcher[int, int] = NaturalBatcher(send, _failure, max_batch=4)
    assert await batcher.submit(1) == 10
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [i * 10 for i in range(10)]
    # The lone item went alone; the ten were all queued before a request went out: at most
    # four per request, in order.
    assert sent[0] == [1]
    assert [len(b) for b in sent[1:]] == [4, 4, 2]
    assert [i for b in sent[1:] for i in b] == list(range(10))
    assert (batcher.calls, batcher.items) == (4, 11)


async def test_items_fail_on_their_own_and_a_failed_request_fails_each_caller_apart() -> None:
    async def send(items: list[int]) -> list[int | BaseException]:
        if 99 in items:
            raise ConnectionError("down")
        return [Refused("odd") if i % 2 else i for i in items]

    batcher: NaturalBatcher[int, int] = NaturalBatcher(send, _failure, max_batch=8)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], Refused) and isinstance(results[3], Refused)
    down = await asyncio.gather(batcher.submit(99), batcher.submit(1), return_exceptions=True)
    assert all(isinstance(e, Refused) and str(e) == "batch failed (ConnectionError)" for e in down)
    assert down[0] is not down[1], "one exception per caller"


async def test_wrong_number_of_answers_fails_every_caller() -> None:
    async def send(items: list[int]) -> list[int | BaseException]:
        return [0]

    batcher: NaturalBatcher[int, int] = NaturalBatcher(send, _failure, max_batch=8)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(e, Refused) for e in results)


async def test_a_cancelled_caller_is_left_out_of_the_next_request() -> None:
    sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int | BaseException]:
        sent.append(items)
        await release.wait()
        return list[int | BaseException](items)

    batcher: NaturalBatcher[int, int] = NaturalBatcher(send, _failure, max_batch=8)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    cancelled, kept = asyncio.ensure_future(batcher.submit(2)), asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    assert (await first, await kept) == (1, 3)
    assert sent == [[1], [3]]


def test_max_batch_must_be_positive() -> None:
    async def send(items: list[int]) -> list[int | BaseException]:
        return list(items)

    with pytest.raises(ValueError):
        NaturalBatcher(send, _failure, max_batch=0)
