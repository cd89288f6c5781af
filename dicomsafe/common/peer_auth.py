"""Per-RPC authorisation of the calling workload by its mutual-TLS identity (least privilege).

Each server has an allowlist ``method → identities`` from its configuration, e.g. for crypto
``Seal=ingest; Open,Describe=gateway; RotateKey,GetKeyStatus,Rewrap=ops``. A method not
listed is refused to everyone (deny by default). Only the standard health service answers any
peer, so probes work without a certificate. A user's own rights are a separate question,
answered by authz for the user's token; this only decides which *service* may ask at all.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from dicomsafe.common.config import ConfigError
from dicomsafe.common.metrics import REFUSED_CALLS
from dicomsafe.common.tls import negotiated_tls_version, peer_identity

log = logging.getLogger("dicomsafe.peer_auth")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REQUIRED_TLS_VERSION = "TLSv1.3"


@dataclass(frozen=True)
class PeerAllowlist:
    """Which identities may call which method (by the method's short name)."""

    rules: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> PeerAllowlist:
        """``Method[,Method]=identity[,identity]`` clauses separated by ``;``."""
        rules: dict[str, set[str]] = {}
        for clause in (c.strip() for c in spec.split(";")):
            if not clause:
                continue
            methods, sep, identities = clause.partition("=")
            names = {m.strip() for m in methods.split(",") if m.strip()}
            who = {i.strip() for i in identities.split(",") if i.strip()}
            if not sep or not names or not who:
                raise ConfigError(f"peer allowlist clause {clause!r} is not 'Method[,Method]=identity[,identity]'")
            for name in names:
                rules.setdefault(name, set()).update(who)
        return cls({m: frozenset(w) for m, w in rules.items()})

    def allows(self, method: str, identity: str | None) -> bool:
        return identity is not None and identity in self.rules.get(method, frozenset())


Behavior = Callable[..., Any]


class PeerAuthorizer(grpc.aio.ServerInterceptor):
    """Refuses, with ``PERMISSION_DENIED``, calls from identities the allowlist does not name,
    and calls over anything but TLS 1.3 (a second line behind the handshake's own refusal)."""

    def __init__(self, allow: PeerAllowlist) -> None:
        self._allow = allow

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method: str = handler_call_details.method
        if handler is None or full_method.startswith(HEALTH_PREFIX):
            return handler
        method = full_method.rsplit("/", 1)[-1]

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            auth = context.auth_context()
            identity = peer_identity(auth)
            version = negotiated_tls_version(auth)
            if version != REQUIRED_TLS_VERSION:
                REFUSED_CALLS.labels(full_method, "tls").inc()
                log.warning("call refused: not TLS 1.3", extra={"method": method, "tls_version": version or "none"})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} requires mutual TLS 1.3")
            if not self._allow.allows(method, identity):
                REFUSED_CALLS.labels(full_method, "identity").inc()
                shown = identity or "no service identity"
                log.warning("call refused: identity not allowed", extra={"method": method, "peer_identity": shown})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller '{shown}' may not call {method}")

        return _guarded(handler, check)


def _guarded(
    handler: Any, check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with ``check`` run before the servicer sees the request."""
    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, check), request_deserializer=deser, response_serializer=ser
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, check), request_deserializer=deser, response_serializer=ser
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, check), request_deserializer=deser, response_serializer=ser
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary(handler.unary_unary, check), request_deserializer=deser, response_serializer=ser
    )


def _unary(inner: Behavior, check: Callable[[Any], Awaitable[None]]) -> Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await check(context)
        return await inner(request, context)

    return behavior


def _streaming(inner: Behavior, check: Callable[[Any], Awaitable[None]]) -> Behavior:
    if not inspect.isasyncgenfunction(inner):
        # A servicer that answers through context.write() returns a coroutine, not a generator.
        return _unary(inner, check)

    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await check(context)
        # Closed with the call, so a servicer's resources (open files) go at once, not at GC.
        async with contextlib.aclosing(inner(request, context)) as responses:
            async for response in responses:
                yield response

    return behavior
