"""The DICOMweb listener: uvicorn on a TLS 1.3-only context (dicomsafe.common.tls), stopped by the
service's stop event."""

from __future__ import annotations

import asyncio
import ssl

import uvicorn
from starlette.types import ASGIApp

from dicomsafe.common.config import host_port


async def serve_https(app: ASGIApp, bind: str, context: ssl.SSLContext, stop: asyncio.Event) -> None:
    host, port = host_port(bind, "0.0.0.0")  # noqa: S104 - only when the operator binds ":port"
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,  # request lines carry UIDs; the audit trail records accesses instead
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    config.load()
    config.ssl = context
    server = uvicorn.Server(config)
    # startup/shutdown rather than serve(): serve() would take over the process's signal handlers.
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    if server.should_exit:
        raise RuntimeError(f"cannot serve HTTPS on {bind}")
    try:
        await stop.wait()
    finally:
        await server.shutdown()
