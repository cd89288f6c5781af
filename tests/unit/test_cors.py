"""CORS: allowed origins get their headers on every answer, errors included; others get none."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway.cors import Cors, parse_origins

VIEWER = "https://viewer.hospital.example"


async def _ok(_: Request) -> Response:
    return JSONResponse({"ok": True})


async def _denied(_: Request) -> Response:
    return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="dicomsafe"'})


async def _broken(_: Request) -> Response:
    raise RuntimeError("boom")


async def _on_unexpected(_: Request, __: Exception) -> Response:
    return JSONResponse({}, status_code=500)


APP = Starlette(
    routes=[Route("/ok", _ok), Route("/denied", _denied), Route("/broken", _broken)],
    exception_handlers={Exception: _on_unexpected},
)


def _call(app: Any, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 443),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        with contextlib.suppress(RuntimeError):  # Starlette re-raises after sending its 500
            await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


@pytest.mark.parametrize(("path", "status"), [("/ok", 200), ("/denied", 401), ("/broken", 500)])
def test_an_allowed_origin_gets_cors_headers_on_every_answer(path: str, status: int) -> None:
    got, headers = _call(Cors(APP, {VIEWER}), "GET", path, {"Origin": VIEWER})
    assert got == status
    assert headers["access-control-allow-origin"] == VIEWER
    assert headers["access-control-allow-credentials"] == "true"
    assert "WWW-Authenticate" in headers["access-control-expose-headers"]
    assert "Origin" in headers["vary"]


def test_another_origin_gets_no_cors_headers() -> None:
    status, headers = _call(Cors(APP, {VIEWER}), "GET", "/ok", {"Origin": "https://evil.example"})
    assert status == 200 and not any(k.startswith("access-control-") for k in headers)
    assert "Origin" in headers["vary"]


def test_preflight_is_answered_for_allowed_origins_only() -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers = _call(Cors(APP, {VIEWER}), "OPTIONS", "/ok", {"Origin": VIEWER, **ask})
    assert status == 204
    assert headers["access-control-allow-origin"] == VIEWER
    assert "POST" in headers["access-control-allow-methods"]
    assert "Authorization" in headers["access-control-allow-headers"]
    refused, headers = _call(Cors(APP, {VIEWER}), "OPTIONS", "/ok", {"Origin": "https://evil.example", **ask})
    assert refused == 403 and "access-control-allow-origin" not in headers


def test_without_origins_nothing_changes() -> None:
    status, headers = _call(Cors(APP, set()), "GET", "/ok", {"Origin": VIEWER})
    assert status == 200 and "access-control-allow-origin" not in headers and "vary" not in headers


@pytest.mark.parametrize("bad", ["*", "viewer.example", "https://", "https://viewer.example/app", "ftp://x.example"])
def test_origins_are_exact_scheme_host_port(bad: str) -> None:
    with pytest.raises(ValueError, match="scheme://host"):
        parse_origins(bad)


def test_origins_parse() -> None:
    assert parse_origins(f" {VIEWER}/ , http://localhost:3000") == {VIEWER, "http://localhost:3000"}
    assert parse_origins("") == frozenset()
