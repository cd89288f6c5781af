"""gRPC server and channel helpers: mutual TLS, peer authorisation, health service, message
limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dicomsafe.common.config import ConfigError, env_opt
from dicomsafe.common.logs import setup_logging
from dicomsafe.common.metrics import serve_metrics
from dicomsafe.common.peer_auth import PeerAllowlist, PeerAuthorizer
from dicomsafe.common.tls import TlsConfig, require_tls_or_opt_out

# Streams carry data in chunks well below this; the limit only stops abuse.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30000),
]

Registrar = Callable[[grpc.aio.Server], None]


def new_server(
    registrars: Sequence[Registrar],
    service_names: Sequence[str],
    bind: str,
    *,
    tls: TlsConfig | None,
    allow: PeerAllowlist,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server on ``bind``: mutual TLS 1.3 with per-method peer authorisation (``allow``), or
    plaintext without either when TLS is off (development opt-out only).

    ``GRPC_HEALTH_BIND`` adds a plaintext port for probes that cannot present a certificate
    (the kubelet's gRPC probe): the same server, but the peer authoriser refuses every method
    except the health service to a caller without a verified identity.
    """
    require_tls_or_opt_out(tls, f"gRPC server on {bind}")
    interceptors = [PeerAuthorizer(allow)] if tls is not None else []
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
    for register in registrars:
        register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(bind, tls.server_credentials()) if tls else server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {bind}")
    health_bind = env_opt("GRPC_HEALTH_BIND")
    if health_bind and server.add_insecure_port(health_bind) == 0:
        raise RuntimeError(f"cannot bind gRPC health port to {health_bind}")
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


def new_channel(target: str, tls: TlsConfig | None) -> grpc.aio.Channel:
    """A channel presenting this workload's certificate (plaintext only under the opt-out)."""
    require_tls_or_opt_out(tls, f"gRPC channel to {target}")
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=CHANNEL_OPTIONS)


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

    loop = env_opt("EVENT_LOOP", "uvloop").strip().lower()
    if loop == "uvloop":
        import uvloop

        uvloop.run(_main())
    elif loop == "asyncio":
        asyncio.run(_main())
    else:
        raise ConfigError("EVENT_LOOP must be uvloop or asyncio")
