"""The DICOMweb routes (PS3.18): STOW-RS, QIDO-RS and WADO-RS under one root; break-glass beside it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp

from services.gateway import break_glass, qido, stow, wado
from services.gateway.cors import Cors
from services.gateway.dicomweb_common import Backends, HttpError, error_response, log

Handler = Callable[[Request], Awaitable[Response]]
# Not DICOMweb: the gateway's own API (break-glass), beside the DICOMweb root.
API_ROOT = "/api/v1"


def create_app(backends: Backends, cors_origins: frozenset[str] = frozenset()) -> ASGIApp:
    """The routes, wrapped so browsers of the allowed origins may call them (services.gateway.cors)."""
    return Cors(_routes_app(backends), cors_origins)


def _routes_app(backends: Backends) -> Starlette:
    root = backends.root

    def route(
        path: str, handler: Callable[..., Awaitable[Response]], method: str, prefix: str = root, **fixed: str
    ) -> Route:
        async def endpoint(request: Request) -> Response:
            return await handler(request, backends, **fixed, **request.path_params)

        return Route(prefix + path, endpoint, methods=[method])

    routes = [
        route("/studies", stow.store, "POST"),
        route("/studies/{study_uid}", stow.store, "POST"),
        route("/studies", qido.search, "GET", level="study"),
        route("/series", qido.search, "GET", level="series"),
        route("/instances", qido.search, "GET", level="instance"),
        route("/studies/{study_uid}/series", qido.search, "GET", level="series"),
        route("/studies/{study_uid}/instances", qido.search, "GET", level="instance"),
        route("/studies/{study_uid}/series/{series_uid}/instances", qido.search, "GET", level="instance"),
        route("/studies/{study}", wado.instances, "GET"),
        route("/studies/{study}/metadata", wado.metadata, "GET"),
        route("/studies/{study}/series/{series}", wado.instances, "GET"),
        route("/studies/{study}/series/{series}/metadata", wado.metadata, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}", wado.instances, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/metadata", wado.metadata, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}", wado.frames, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/bulkdata/7fe00010", wado.pixel_bulkdata, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{path:path}", wado.header_bulkdata, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/rendered", wado.rendered, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered", wado.rendered, "GET"),
        route("/studies/{study}/thumbnail", wado.thumbnail, "GET"),
        route("/studies/{study}/series/{series}/thumbnail", wado.thumbnail, "GET"),
        route("/studies/{study}/series/{series}/instances/{sop}/thumbnail", wado.thumbnail, "GET"),
        route("/wado", wado.uri, "GET"),
        route("/studies/{study}/break-glass", break_glass.request_override, "POST", prefix=API_ROOT),
    ]

    async def on_http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        return error_response(exc)

    async def on_routing(request: Request, exc: Exception) -> Response:
        # Unknown paths (404) and wrong methods (405, with Allow) answer like every other error
        # of their root, instead of Starlette's plain text.
        assert isinstance(exc, HTTPException)
        comment = "no such resource" if exc.status_code == 404 else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            comment = "method not allowed"
            # Starlette names the methods of the first route on the path only; one path can have
            # several (STOW-RS POST and WADO-RS GET on /studies/{study}).
            matching = [r for r in routes if r.matches(request.scope)[0] != Match.NONE]
            headers["Allow"] = ", ".join(sorted({m for r in matching for m in r.methods or ()}))
        if request.url.path.startswith(API_ROOT + "/"):
            return break_glass.problem(exc.status_code, comment, headers=headers)
        return error_response(HttpError(exc.status_code, comment, headers))

    async def on_unexpected(_request: Request, exc: Exception) -> Response:
        # The type only: messages of parsing errors can quote DICOM values.
        log.error("request failed", extra={"error": type(exc).__name__})
        return error_response(HttpError(500, "internal error"))

    return Starlette(
        routes=routes,
        exception_handlers={HttpError: on_http_error, HTTPException: on_routing, Exception: on_unexpected},
    )
