"""A CryptoService that only moves bytes: the gRPC transport floor for the crypto bench.

Open streams ``length`` bytes back in pieces of the sealed chunk size (sealing no longer moves
bytes over gRPC: it happens where they are, with a key from PrepareSeal). Same server options,
same stub calls, a process of its own as the real service is: whatever the real service loses
beyond this is ours (AES-GCM, Vault, audit), the rest is Python gRPC. Not a test double: the
tests always talk to the real service.

    python -m tools.bench.grpc_floor --bind 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator

import grpc

from dicomsafe.common.grpc_runtime import new_server, run_until_stopped, service_main
from dicomsafe.common.tls import tls_from_env
from dicomsafe.storage.sealed_format import DEFAULT_CHUNK_SIZE
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.crypto.config import DEFAULT_ALLOWLIST
from services.crypto.service import SERVICE_NAME


class TransportOnly(crypto_pb2_grpc.CryptoServiceServicer):
    def __init__(self) -> None:
        self._source = bytearray(os.urandom(DEFAULT_CHUNK_SIZE))

    async def Open(
        self, request: crypto_pb2.OpenRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[crypto_pb2.OpenResponse]:
        left = request.length
        while left > 0:
            # A fresh bytes object per message, as decryption yields one per chunk: sending the
            # same object again and again is markedly slower through protobuf and grpc.aio.
            piece = bytes(memoryview(self._source)[: min(left, len(self._source))])
            left -= len(piece)
            yield crypto_pb2.OpenResponse(data=piece)

    # Only the data path is measured; the rest of the contract is not offered.
    async def PrepareSeal(
        self, request: crypto_pb2.PrepareSealRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.PrepareSealResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "transport floor only")

    async def Describe(
        self, request: crypto_pb2.DescribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.ObjectDescription:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "transport floor only")

    async def RotateKey(
        self, request: crypto_pb2.RotateKeyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.KeyStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "transport floor only")

    async def GetKeyStatus(
        self, request: crypto_pb2.KeyStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.KeyStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "transport floor only")

    async def Rewrap(
        self, request: crypto_pb2.RewrapRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[crypto_pb2.RewrapProgress]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "transport floor only")
        yield crypto_pb2.RewrapProgress()  # unreachable: makes this an async generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", required=True)
    args = parser.parse_args()

    async def run(stop: asyncio.Event) -> None:
        servicer = TransportOnly()
        # Mutual TLS and the peer allowlist as the real crypto service has them (TLS_* from the
        # environment), so the floor pays the same transport costs.
        server, health = new_server(
            [lambda s: crypto_pb2_grpc.add_CryptoServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            args.bind,
            tls=tls_from_env(),
            allow=DEFAULT_ALLOWLIST,
        )
        await run_until_stopped(server, health, [SERVICE_NAME], stop, logging.getLogger("bench"))

    service_main("bench-grpc-floor", run)


if __name__ == "__main__":
    main()
