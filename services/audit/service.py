"""AuditService gRPC: Verify the chains, Query records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from pymongo.errors import PyMongoError

from dicomsafe.common.vault import VaultUnavailable
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc
from services.audit.checkpoints import CheckpointSigner
from services.audit.store import AuditStore

SERVICE_NAME = "dicomsafe.v1.AuditService"


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: AuditStore, signer: CheckpointSigner | None) -> None:
        self._store = store
        self._signer = signer

    async def Verify(
        self, request: audit_pb2.VerifyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> audit_pb2.VerifyResponse:
        try:
            keys = await asyncio.to_thread(self._signer.public_keys) if self._signer else None
            verdict = await self._store.verify(request.chain, keys)
        except PyMongoError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit store unavailable ({type(exc).__name__})")
        except VaultUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint keys unavailable: {exc}")
        return audit_pb2.VerifyResponse(
            ok=verdict.ok,
            chains_checked=verdict.chains,
            records_checked=verdict.records,
            broken=[audit_pb2.BrokenLink(chain=b.chain, seq=b.seq, reason=b.reason) for b in verdict.breaks],
            checkpoints_checked=verdict.checkpoints,
        )

    async def Query(
        self, request: audit_pb2.QueryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        since = request.since.ToDatetime(tzinfo=None) if request.HasField("since") else None
        until = request.until.ToDatetime(tzinfo=None) if request.HasField("until") else None
        try:
            async for record in self._store.query(
                patient_ref=request.patient_ref,
                study_instance_uid=request.study_instance_uid,
                actor=request.actor,
                object_id=request.object_id,
                since=since,
                until=until,
                limit=request.limit or 100,
            ):
                yield record
        except PyMongoError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"audit store unavailable ({type(exc).__name__})")
