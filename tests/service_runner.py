"""Running one service in-process for integration tests, against the real servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_serving(target: str, task: asyncio.Task[None], timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if task.done():
                task.result()  # re-raises the start-up error
                raise RuntimeError("service stopped before serving")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"service at {target} not serving after {timeout_s}s")
            await asyncio.sleep(0.2)


@asynccontextmanager
async def running(run: Callable[[asyncio.Event], Awaitable[None]], target: str) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()

    async def main() -> None:
        await run(stop)

    task = asyncio.create_task(main())
    try:
        await wait_serving(target, task)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)
