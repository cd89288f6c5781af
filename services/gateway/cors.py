"""CORS for browser viewers (OHIF and the like) served from another origin than the gateway.

Only origins on the configured allowlist get CORS headers; every other origin gets none, so
the browser keeps the answer from the page (deny by default). The headers go on every
response to an allowed origin, errors included: a viewer must be able to read a 401's
WWW-Authenticate or a 503's Retry-After to react to it. That is why this is a plain ASGI
wrapper outside everything else, not Starlette's middleware, which is inside the handler of
unexpected errors and leaves 500s without them.

Preflights are answered here and reach no route: they carry no token, ask nothing of the
data, and are not accesses for the audit trail.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOWED_METHODS = "GET, POST, OPTIONS"
# What DICOMweb clients send: the bearer token, STOW's multipart type, Accept negotiation.
ALLOWED_HEADERS = "Authorization, Content-Type, Accept"
# What a viewer needs to read: the body's type and size, where a stored study is, and how to
# react to an error (re-authenticate, step up, retry later).
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, Location, WWW-Authenticate, Retry-After, Warning"
PREFLIGHT_MAX_AGE_S = 600


def parse_origins(value: str) -> frozenset[str]:
    """``GATEWAY_CORS_ORIGINS``: comma-separated exact origins (scheme://host[:port])."""
    origins = frozenset(o.strip().rstrip("/") for o in value.split(",") if o.strip())
    for origin in origins:
        scheme, sep, rest = origin.partition("://")
        if origin == "*" or not sep or scheme not in ("https", "http") or not rest or "/" in rest:
            raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port]")
    return origins


class Cors:
    def __init__(self, app: ASGIApp, origins: Iterable[str]) -> None:
        self._app = app
        self._origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._origins:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin", "")
        allowed = origin in self._origins
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin if allowed else "", send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers.add_vary_header("Origin")
                if allowed:
                    response_headers["Access-Control-Allow-Origin"] = origin
                    response_headers["Access-Control-Allow-Credentials"] = "true"
                    response_headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            await send(message)

        await self._app(scope, receive, send_with_cors)

    @staticmethod
    async def _preflight(origin: str, send: Send) -> None:
        headers = [(b"vary", b"Origin"), (b"content-length", b"0")]
        if origin:
            headers += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
            ]
        # A refused origin gets a plain 403 without CORS headers: its browser reports the failure.
        await send({"type": "http.response.start", "status": 204 if origin else 403, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
