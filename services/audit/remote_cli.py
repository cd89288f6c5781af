"""The CLI's path through the running service: the caller's token goes to authz, and the
service audits the attempt. (The direct commands in `__main__` need the database credential
itself — an operator's break-glass path, not a user's.)"""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from dicomsafe.common.config import env_secret
from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.tls import tls_from_env
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc
from services.audit.report import show


def caller_token() -> str:
    """`AUDIT_ACCESS_TOKEN` or `AUDIT_ACCESS_TOKEN_FILE`: a token never goes on a command line."""
    return env_secret("AUDIT_ACCESS_TOKEN") or ""


def _refused(exc: grpc.aio.AioRpcError) -> int:
    print(f"refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 3


async def query_via_service(target: str, subject: str, request: audit_pb2.QueryRequest) -> int:
    request.subject_id, request.access_token = subject, caller_token()
    async with new_channel(target, tls_from_env()) as channel:  # the operator's certificate ("ops")
        try:
            async for record in audit_pb2_grpc.AuditServiceStub(channel).Query(request, timeout=120):
                print(json.dumps(MessageToDict(record, preserving_proto_field_name=True), separators=(",", ":")))
        except grpc.aio.AioRpcError as exc:
            return _refused(exc)
    return 0


async def query_pages_via_service(target: str, subject: str, request: audit_pb2.QueryRequest, all_pages: bool) -> int:
    """One page (its next token on stderr as `next_page_token: T`), or every page in turn."""
    request.subject_id, request.access_token = subject, caller_token()
    async with new_channel(target, tls_from_env()) as channel:  # the operator's certificate ("ops")
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            try:
                page = await stub.QueryPage(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                return _refused(exc)
            for record in page.records:
                print(json.dumps(MessageToDict(record, preserving_proto_field_name=True), separators=(",", ":")))
            if not page.next_page_token:
                return 0
            if not all_pages:
                print(f"next_page_token: {page.next_page_token}", file=sys.stderr)
                return 0
            request.page_token = page.next_page_token


async def verify_via_service(
    target: str, subject: str, chain: str, published_checkpoints: bool = False, json_output: bool = False
) -> int:
    request = audit_pb2.VerifyRequest(
        chain=chain, subject_id=subject, access_token=caller_token(), published_checkpoints=published_checkpoints
    )
    async with new_channel(target, tls_from_env()) as channel:  # the operator's certificate ("ops")
        try:
            verdict = await audit_pb2_grpc.AuditServiceStub(channel).Verify(request, timeout=3600)
        except grpc.aio.AioRpcError as exc:
            return _refused(exc)
    return show(verdict, json_output)
