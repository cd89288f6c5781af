"""Client side of CryptoService.Seal: streams an instance in pieces to the crypto service."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc


@dataclass(frozen=True)
class SealFailure(Exception):
    code: grpc.StatusCode
    detail: str

    @property
    def retryable(self) -> bool:
        return self.code in {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
        }


def object_id_for(sop_instance_uid: str, content_sha256: str) -> str:
    """Same instance, same bytes → same object id: what makes redelivery idempotent."""
    return hashlib.sha256(f"{sop_instance_uid}\0{content_sha256}".encode()).hexdigest()


class Sealer:
    def __init__(self, stub: crypto_pb2_grpc.CryptoServiceAsyncStub, piece_bytes: int, deadline_s: float) -> None:
        self._stub = stub
        self._piece = piece_bytes
        self._deadline = deadline_s

    async def seal(self, data: bytes, metadata: crypto_pb2.SealMetadata) -> crypto_pb2.SealResponse:
        async def requests() -> AsyncIterator[crypto_pb2.SealRequest]:
            yield crypto_pb2.SealRequest(metadata=metadata)
            view = memoryview(data)
            for i in range(0, len(data), self._piece):
                yield crypto_pb2.SealRequest(data=bytes(view[i : i + self._piece]))

        try:
            response: crypto_pb2.SealResponse = await self._stub.Seal(requests(), timeout=self._deadline)
        except grpc.aio.AioRpcError as exc:
            raise SealFailure(exc.code(), exc.details() or "") from None
        return response
