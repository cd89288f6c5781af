"""AuditService gRPC: Verify the chains, Query records — for callers authz allows, every attempt audited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aiokafka.errors import KafkaError
from pymongo.errors import PyMongoError

from dicomsafe.common.vault import VaultUnavailable
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc
from services.audit.access import READ, VERIFY, AuditAccess, Refused, Request
from services.audit.checkpoint_topic import Published, read_published
from services.audit.checkpoints import CheckpointSigner
from services.audit.paging import DEFAULT_PAGE_SIZE, BadPageToken, Filters, decode_token
from services.audit.report import to_response
from services.audit.store import AuditStore

SERVICE_NAME = "dicomsafe.v1.AuditService"


@dataclass(frozen=True)
class PublishedSource:
    """Where signed checkpoints are published (Verify with published_checkpoints reads it)."""

    bootstrap: str
    topic: str


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        store: AuditStore,
        signer: CheckpointSigner | None,
        access: AuditAccess,
        published: PublishedSource | None = None,
    ) -> None:
        self._store = store
        self._signer = signer
        self._access = access
        self._published = published

    async def _authorize(
        self, action: str, request: Request, context: grpc.aio.ServicerContext[object, object]
    ) -> None:
        try:
            await self._access.authorize(action, request)
        except Refused as refused:
            await context.abort(refused.code, refused.message)

    async def Verify(
        self, request: audit_pb2.VerifyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> audit_pb2.VerifyResponse:
        asked = Request(
            "verify",
            request.subject_id,
            request.access_token,
            filters=({"chain": request.chain} if request.chain else {})
            | ({"published_checkpoints": "true"} if request.published_checkpoints else {}),
        )
        await self._authorize(VERIFY, asked, context)
        if request.published_checkpoints and (self._signer is None or self._published is None):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "checkpoints are disabled")
        try:
            keys = await asyncio.to_thread(self._signer.public_keys) if self._signer else None
            found = Published()
            if request.published_checkpoints and keys is not None and self._published is not None:
                found = await read_published(self._published.bootstrap, self._published.topic, keys)
            newest = {c: cp for c, cp in found.newest.items() if not request.chain or c == request.chain}
            verdict = await self._store.verify(request.chain, keys, published=newest)
        except PyMongoError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit store unavailable ({type(exc).__name__})")
        except VaultUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint keys unavailable: {exc}")
        except (KafkaError, TimeoutError, RuntimeError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"published checkpoints unavailable ({type(exc).__name__})"
            )
        published_breaks = [b for b in found.breaks if not request.chain or b.chain == request.chain]
        return to_response(verdict, published_breaks)

    def _filters(self, request: audit_pb2.QueryRequest) -> Filters:
        """The request's filters; ValueError for an action or outcome no record can carry."""
        actions = [audit_pb2.AuditAction.Name(a) for a in request.actions]
        outcomes = [audit_pb2.AuditOutcome.Name(o) for o in request.outcomes]
        if "AUDIT_ACTION_UNSPECIFIED" in actions or "AUDIT_OUTCOME_UNSPECIFIED" in outcomes:
            raise ValueError("action and outcome filters must name a value")
        return Filters(
            patient_ref=request.patient_ref,
            study_instance_uid=request.study_instance_uid,
            actor=request.actor,
            object_id=request.object_id,
            since=request.since.ToDatetime(tzinfo=None) if request.HasField("since") else None,
            until=request.until.ToDatetime(tzinfo=None) if request.HasField("until") else None,
            actions=tuple(actions),
            outcomes=tuple(outcomes),
        )

    async def _authorize_query(
        self,
        request: audit_pb2.QueryRequest,
        paging: dict[str, str],
        context: grpc.aio.ServicerContext[object, object],
    ) -> Filters:
        """Authorise and audit the attempt (with what was asked), then the parsed filters."""
        filters: dict[str, str] = dict(paging)
        if request.actor:
            filters["actor_filter"] = request.actor
        if request.HasField("since"):
            filters["since"] = request.since.ToJsonString()
        if request.HasField("until"):
            filters["until"] = request.until.ToJsonString()
        if request.actions:
            filters["actions"] = ",".join(str(a) for a in request.actions)
        if request.outcomes:
            filters["outcomes"] = ",".join(str(o) for o in request.outcomes)
        asked = Request(
            "query",
            request.subject_id,
            request.access_token,
            study_instance_uid=request.study_instance_uid,
            patient_ref=request.patient_ref,
            object_id=request.object_id,
            filters=filters,
        )
        await self._authorize(READ, asked, context)
        try:
            return self._filters(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this satisfies the type checker

    async def Query(
        self, request: audit_pb2.QueryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        limit = request.limit or 100
        filters = await self._authorize_query(request, {"limit": str(limit)}, context)
        try:
            async for record in self._store.query(filters, limit):
                yield record
        except PyMongoError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit store unavailable ({type(exc).__name__})")

    async def QueryPage(
        self, request: audit_pb2.QueryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> audit_pb2.QueryPageResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        # The token names a record's position, not its content: recorded as it came.
        paging = {"page_size": str(size), **({"page_token": request.page_token} if request.page_token else {})}
        filters = await self._authorize_query(request, paging, context)
        try:
            after = decode_token(request.page_token, filters) if request.page_token else None
        except BadPageToken as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            records, token = await self._store.query_page(filters, size, after)
        except PyMongoError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit store unavailable ({type(exc).__name__})")
        return audit_pb2.QueryPageResponse(records=records, next_page_token=token)
