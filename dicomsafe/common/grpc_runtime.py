"""gRPC server and channel helpers: health service, message limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dicomsafe.common.logs import setup_logging
from dicomsafe.common.metrics import serve_metrics

# Streams carry data in chunks well below this; the limit only stops abuse.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30000),
]

Registrar = Callable[[grpc.aio.Server], None]


def new_server(
    registrars: Sequence[Registrar], service_names: Sequence[str], bind: str
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {bind}")
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health_servicer.set(name, status)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_until_stopped(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: Sequence[str],
    stop: asyncio.Event,
    log: logging.Logger,
    background: Sequence[Awaitable[None]] = (),
    grace_s: float = 10.0,
) -> None:
    """Serve until SIGTERM/SIGINT or a background task ends, then drain in-flight calls."""
    await server.start()
    await set_serving(health_servicer, service_names, True)
    log.info("serving")
    tasks: list[asyncio.Future[None]] = [asyncio.ensure_future(b) for b in background]

    async def wait_stop() -> None:
        await stop.wait()

    stopper = asyncio.ensure_future(wait_stop())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    # Readiness goes first so load balancers stop routing before connections close.
    await set_serving(health_servicer, service_names, False)
    await server.stop(grace_s)
    for task in tasks:
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=grace_s)
            except TimeoutError:
                task.cancel()
    stopper.cancel()
    for finished in done:
        failure = None if finished is stopper else finished.exception()
        if failure is not None:
            raise failure
    log.info("stopped")


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def service_main(service: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Process entry point shared by every service: JSON logs, SIGTERM → graceful stop."""
    log = setup_logging(service)
    served = serve_metrics()
    if served:
        log.info("metrics served", extra={"bind": served})

    async def _main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run(stop)

    asyncio.run(_main())
