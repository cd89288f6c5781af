"""Sealing where the bytes already are: crypto issues the key, this process encrypts and stores.

The key broker pattern (AWS KMS GenerateDataKey, Vault Transit's datakey endpoint): the process
that holds an instance in plaintext anyway (ingest for the topic, the gateway for STOW-RS) asks
crypto's ``PrepareSeal`` for the object's sealed header and content key, seals it with AES-256-GCM
(:mod:`dicomsafe.storage.sealed_format`) and puts the sealed bytes into the object store. What it
is given opens this one object only: the data key and the patient's erasure key stay in crypto,
the Transit key stays in Vault, and the store only ever sees sealed bytes. Before, the same
plaintext travelled over one or two gRPC streams to reach crypto; now it does not move at all.

Nothing is visible in the store before the put commits, so a crash mid-seal leaves nothing an
index or a reader could find; the redelivery (same content, same object id) seals it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from dicomsafe.common.batching import NaturalBatcher
from dicomsafe.common.metrics import BYTES, DURATION
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import ObjectStore, PendingObject
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc

log = logging.getLogger("dicomsafe.sealer")

# Plaintext sealed per write: bounds the ciphertext held at once whatever the instance's size.
WRITE_PIECE = 1024 * 1024
# Objects per PrepareSeal call (the contract's limit, enforced by crypto): a STOW-RS request's
# parts in flight, or a fetched batch of topic records, with room to spare.
MAX_PREPARE_BATCH = 64

Status = crypto_pb2.PrepareStatus


@dataclass(frozen=True)
class SealFailure(Exception):
    """The object was not stored; ``code`` says whether trying again can help."""

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


@dataclass(frozen=True)
class Sealed:
    object: crypto_pb2.ObjectDescription
    plaintext_sha256: str
    # A redelivery: the object was stored before, nothing was written.
    already_stored: bool


def _prepare_failure(cause: BaseException | None) -> BaseException:
    if cause is None:
        return SealFailure(grpc.StatusCode.UNAVAILABLE, "seal key request interrupted")
    return SealFailure(grpc.StatusCode.INTERNAL, f"seal key request failed ({type(cause).__name__})")


class _HashMismatch(Exception):
    pass


def _seal_and_put(
    writer: fmt.SealWriter, pending: PendingObject, data: bytes, expected_sha256: str, known_sha256: str = ""
) -> tuple[str, bool]:
    """(plaintext SHA-256, committed); runs off the event loop: SHA-256 and the writes release
    the GIL. Raises _HashMismatch before anything is published. ``known_sha256`` is the digest
    of ``data`` taken by this process (bytes are immutable): hashing again would only repeat it."""
    view = memoryview(data)
    digest = None if known_sha256 else hashlib.sha256()
    pending.write(writer.header_bytes())
    for i in range(0, len(data), WRITE_PIECE):
        piece = view[i : i + WRITE_PIECE]
        if digest is not None:
            digest.update(piece)
        pending.write(writer.update(piece))
    pending.write(writer.finalize())
    sha = digest.hexdigest() if digest is not None else known_sha256
    if expected_sha256 and sha != expected_sha256:
        raise _HashMismatch
    return sha, pending.commit()


class Sealer:
    """Seals whole instances (both callers hold one whole, having validated it) into ``store``."""

    def __init__(
        self,
        stub: crypto_pb2_grpc.CryptoServiceAsyncStub,
        store: ObjectStore,
        deadline_s: float,
        executor: Executor | None = None,
        service: str = "sealer",
    ) -> None:
        self._stub = stub
        self._store = store
        self._deadline = deadline_s
        # A small pool of the caller's own: each thread that allocates keeps a malloc arena, and
        # the default pool's many threads each kept freed chunks (measured: +50 MiB RSS).
        self._executor = executor
        self._service = service
        # Seals in flight together (a study's instances) share one PrepareSeal call, and so one
        # round trip, one batch of Transit wraps and one batch of audit records in crypto.
        self._prepares: NaturalBatcher[crypto_pb2.SealMetadata, crypto_pb2.PreparedSeal] = NaturalBatcher(
            self._prepare_batch, _prepare_failure, MAX_PREPARE_BATCH
        )

    @property
    def prepare_calls(self) -> int:
        """PrepareSeal calls made (batching makes them fewer than the seals)."""
        return self._prepares.calls

    async def seal(self, data: bytes, request: crypto_pb2.SealMetadata, *, sha256_of_data: str = "") -> Sealed:
        """Seal and store ``data``. ``sha256_of_data``: its SHA-256, when the caller has just taken
        it from this same bytes object (it named the object by it), so the write skips a second
        pass over the plaintext; otherwise ``request.expected_sha256``, if set, is checked."""
        if request.expected_size and request.expected_size != len(data):
            raise SealFailure(grpc.StatusCode.INVALID_ARGUMENT, "size does not match expected_size")
        # The size goes with the request either way: crypto's object limit is checked before
        # any key is issued.
        metadata = crypto_pb2.SealMetadata()
        metadata.CopyFrom(request)
        metadata.expected_size = len(data)
        prepared = await self._prepare(metadata)
        if prepared.status == Status.PREPARE_STATUS_ALREADY_STORED:
            return Sealed(prepared.object, metadata.expected_sha256, True)
        if prepared.status == Status.PREPARE_STATUS_DUPLICATE_SOP_INSTANCE:
            raise SealFailure(
                grpc.StatusCode.ALREADY_EXISTS,
                "duplicate_sop_instance: an instance with this SOP Instance UID and other content is stored",
            )
        if prepared.status != Status.PREPARE_STATUS_READY:
            raise SealFailure(grpc.StatusCode.INVALID_ARGUMENT, prepared.detail or "crypto refused the object")
        try:
            header, _ = fmt.SealedHeader.decode(prepared.header)
            writer = fmt.SealWriter(prepared.content_key, header)
        except (fmt.SealedFormatError, ValueError) as exc:
            raise SealFailure(grpc.StatusCode.INTERNAL, f"unusable seal header ({type(exc).__name__})") from None
        if header.object_id != metadata.object_id:
            raise SealFailure(grpc.StatusCode.INTERNAL, "seal header names another object")
        return await self._write(writer, data, metadata, sha256_of_data)

    async def _prepare(self, metadata: crypto_pb2.SealMetadata) -> crypto_pb2.PreparedSeal:
        return await self._prepares.submit(metadata)

    async def _prepare_batch(
        self, objects: list[crypto_pb2.SealMetadata]
    ) -> list[crypto_pb2.PreparedSeal | BaseException]:
        try:
            response: crypto_pb2.PrepareSealResponse = await self._stub.PrepareSeal(
                crypto_pb2.PrepareSealRequest(objects=objects), timeout=self._deadline
            )
        except grpc.aio.AioRpcError as exc:
            return [SealFailure(exc.code(), exc.details() or "") for _ in objects]
        if len(response.objects) != len(objects):
            return [SealFailure(grpc.StatusCode.INTERNAL, "crypto answered for other objects") for _ in objects]
        return [
            prepared
            if prepared.object_id == meta.object_id
            else SealFailure(grpc.StatusCode.INTERNAL, "crypto answered for another object")
            for meta, prepared in zip(objects, response.objects, strict=True)
        ]

    async def _write(
        self, writer: fmt.SealWriter, data: bytes, metadata: crypto_pb2.SealMetadata, known_sha256: str
    ) -> Sealed:
        loop = asyncio.get_running_loop()
        pending = self._store.begin_write(metadata.object_id)
        with DURATION.labels(self._service, "seal").time():
            work = loop.run_in_executor(
                self._executor, _seal_and_put, writer, pending, data, metadata.expected_sha256, known_sha256
            )
            try:
                sha, committed = await asyncio.shield(work)
            except BaseException as exc:
                if not work.done():
                    # Cancelled while the worker still writes into the pending object: let it
                    # finish before its file is dropped under it.
                    await asyncio.wait([work])
                if work.cancelled() or work.exception() is not None:
                    await self._abort(pending)
                if isinstance(exc, _HashMismatch):
                    raise SealFailure(grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match expected_sha256") from None
                if isinstance(exc, Exception):
                    # Only the put can fail here (the store unreachable or full: an OSError, a
                    # botocore error): nothing was published, the seal can be retried.
                    log.warning(
                        "object store write failed",
                        extra={"object_id": metadata.object_id, "error": type(exc).__name__},
                    )
                    raise SealFailure(
                        grpc.StatusCode.UNAVAILABLE, f"object store write failed ({type(exc).__name__})"
                    ) from None
                raise
        header = writer.header
        if not committed:
            # Another writer stored this id meanwhile: its object (same plaintext) is the one kept.
            log.info("object stored concurrently by another writer", extra={"object_id": header.object_id})
        BYTES.labels(self._service, "seal").inc(len(data))
        desc = crypto_pb2.ObjectDescription(
            object_id=header.object_id,
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            plaintext_size=len(data),
            sealed_size=pending.size,
            key_name=header.key_name,
            key_version=header.key_version,
            chunk_size=header.chunk_size,
            format_version=fmt.FORMAT_VERSION,
            erasure_key_ref=header.erasure_key_ref,
        )
        return Sealed(desc, sha, not committed)

    async def _abort(self, pending: PendingObject) -> None:
        if self._store.reads_block:
            # Even when the call is being cancelled; at worst the upload stays a leftover, never
            # a visible object.
            await asyncio.shield(asyncio.to_thread(pending.abort))
        else:
            pending.abort()  # at once: a cancelled seal must not leave a temp file behind
