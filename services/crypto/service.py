"""CryptoService gRPC: issue seal keys (the key broker), open (whole or a byte range), describe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import BinaryIO, TypeVar

import grpc

from dicomsafe.common.audit_emitter import AuditEmitter, stable_event_id
from dicomsafe.common.metrics import BYTES, DURATION
from dicomsafe.common.tls import peer_identity
from dicomsafe.common.vault import VaultUnavailable
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import InvalidObjectId, ObjectStore, validate_object_id
from dicomsafe.storage.sealer import MAX_PREPARE_BATCH
from dicomsafe.v1 import audit_pb2, crypto_pb2, crypto_pb2_grpc
from services.crypto.rewrap import Rewrapper
from services.crypto.vault_keys import (
    KeyVersions,
    ObjectErased,
    TransitKeys,
    WrappedKeyRejected,
    zero,
)

log = logging.getLogger("dicomsafe.crypto")

SERVICE_NAME = "dicomsafe.v1.CryptoService"
# Plaintext is streamed back one verified chunk at a time, a chunk larger than this (chunk
# sizes go up to 16 MiB) in pieces of this size: well under the 4 MiB gRPC message limit.
OPEN_PIECE_BYTES = 1024 * 1024
# Plaintext decrypted per thread hand-off when the store's reads block (S3): a hop per 256 KiB
# chunk costs as much as a network read; more would only hold more plaintext in memory.
OPEN_BATCH_BYTES = 1024 * 1024

T = TypeVar("T")


class AuditUnavailable(Exception):
    """The audit event of an issued key was not acknowledged."""


Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome


def _pieces(chunk: bytes) -> Iterator[bytes]:
    if len(chunk) <= OPEN_PIECE_BYTES:
        yield chunk  # the default 256 KiB chunk: no copy
        return
    view = memoryview(chunk)
    for i in range(0, len(chunk), OPEN_PIECE_BYTES):
        yield bytes(view[i : i + OPEN_PIECE_BYTES])


def _take(chunks: Iterator[bytes], budget: int) -> list[bytes]:
    """The next chunks, up to ``budget`` bytes (at least one, none at the end)."""
    batch: list[bytes] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= budget:
            break
    return batch


def _caller(context: grpc.aio.ServicerContext[object, object]) -> str:
    # The verified service identity from the client certificate; the address only on the
    # plaintext development path, where there is none.
    identity = peer_identity(context.auth_context())
    return f"service:{identity}" if identity else f"peer:{context.peer()}"


class CryptoServicer(crypto_pb2_grpc.CryptoServiceServicer):
    def __init__(
        self, store: ObjectStore, keys: TransitKeys, audit: AuditEmitter, chunk_size: int, max_object_bytes: int
    ) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit
        self._chunk_size = chunk_size
        self._max_object_bytes = max_object_bytes
        self._rewrapper = Rewrapper(store, keys, audit)

    async def _store_io(self, fn: Callable[..., T], *args: object) -> T:
        """Store calls that may wait on the network run off the event loop; a filesystem's
        run inline (a stat or a page-cache read costs less than the thread hand-off)."""
        if self._store.reads_block:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # -- describe ---------------------------------------------------------------------------

    def _describe_file(self, f: BinaryIO) -> tuple[crypto_pb2.ObjectDescription, fmt.SealedHeader, int]:
        header, header_len = fmt.read_header(f)
        sealed_size = f.seek(0, 2)
        desc = crypto_pb2.ObjectDescription(
            object_id=header.object_id,
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            plaintext_size=fmt.plaintext_length(header, header_len, sealed_size),
            sealed_size=sealed_size,
            key_name=header.key_name,
            key_version=header.key_version,
            chunk_size=header.chunk_size,
            format_version=fmt.FORMAT_VERSION,
            erasure_key_ref=header.erasure_key_ref,
        )
        return desc, header, header_len

    async def _open_existing(
        self, object_id: str, context: grpc.aio.ServicerContext[object, object]
    ) -> tuple[BinaryIO, crypto_pb2.ObjectDescription, fmt.SealedHeader, int]:
        try:
            f = await self._store_io(self._store.open_read, object_id)
        except InvalidObjectId as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such object")
        try:
            desc, header, header_len = await self._store_io(self._describe_file, f)
        except fmt.SealedFormatError as exc:
            f.close()
            await context.abort(grpc.StatusCode.DATA_LOSS, f"sealed object unreadable: {type(exc).__name__}")
        if header.object_id != object_id:
            f.close()
            await context.abort(grpc.StatusCode.DATA_LOSS, "sealed object header names another object")
        return f, desc, header, header_len

    async def Describe(
        self, request: crypto_pb2.DescribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.ObjectDescription:
        f, desc, _, _ = await self._open_existing(request.object_id, context)
        f.close()
        return desc

    # -- key broker -------------------------------------------------------------------------

    async def PrepareSeal(
        self, request: crypto_pb2.PrepareSealRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.PrepareSealResponse:
        if not request.objects:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no objects to prepare")
        if len(request.objects) > MAX_PREPARE_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_PREPARE_BATCH} objects per call")
        caller = _caller(context)
        try:
            with DURATION.labels("crypto", "prepare_seal").time():
                prepared = await asyncio.gather(*(self._prepare(meta, caller) for meta in request.objects))
        except VaultUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except AuditUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit trail unavailable")
        return crypto_pb2.PrepareSealResponse(objects=prepared)

    async def _prepare(self, meta: crypto_pb2.SealMetadata, caller: str) -> crypto_pb2.PreparedSeal:
        Status = crypto_pb2.PrepareStatus
        try:
            validate_object_id(meta.object_id)
        except InvalidObjectId as exc:
            return crypto_pb2.PreparedSeal(
                object_id=meta.object_id, status=Status.PREPARE_STATUS_INVALID, detail=str(exc)
            )
        if meta.expected_size > self._max_object_bytes:
            return crypto_pb2.PreparedSeal(
                object_id=meta.object_id,
                status=Status.PREPARE_STATUS_INVALID,
                detail=f"object exceeds {self._max_object_bytes} bytes",
            )
        if await self._store_io(self._store.exists, meta.object_id):
            # A redelivery of an object already sealed: the id derives from the content, so
            # there is nothing new to write and no key to issue.
            stored = await self._describe_stored(meta.object_id)
            if stored is not None:
                return crypto_pb2.PreparedSeal(
                    object_id=meta.object_id, status=Status.PREPARE_STATUS_ALREADY_STORED, object=stored
                )
        if meta.sop_instance_uid:
            # Claimed before a key is issued, so that of two instances with one UID and different
            # content only the first is ever stored; the claim of a seal that then fails stays with
            # it, and its redelivery (same content, same object id) finds the claim its own.
            holder = await self._store_io(self._store.claim, meta.sop_instance_uid, meta.object_id)
            if holder != meta.object_id:
                # Audited by the caller as the instance's rejection (one record of it, with the sender).
                return crypto_pb2.PreparedSeal(
                    object_id=meta.object_id, status=Status.PREPARE_STATUS_DUPLICATE_SOP_INSTANCE
                )
        dek = await self._keys.new_data_key()
        erasure_ref, erasure_key = "", None
        try:
            if meta.patient_id:
                erasure_ref = await self._keys.erasure_ref(meta.issuer_of_patient_id, meta.patient_id)
                erasure_key = await self._keys.erasure_key_for_seal(erasure_ref)
            header = fmt.SealedHeader.create(
                key_name=dek.key_name,
                key_version=dek.key_version,
                wrapped_dek=dek.wrapped,
                object_id=meta.object_id,
                sop_instance_uid=meta.sop_instance_uid,
                study_instance_uid=meta.study_instance_uid,
                chunk_size=self._chunk_size,
                erasure_key_ref=erasure_ref,
            )
            key = fmt.content_key(dek.plaintext, erasure_key, header)
        except ValueError as exc:
            return crypto_pb2.PreparedSeal(
                object_id=meta.object_id, status=Status.PREPARE_STATUS_INVALID, detail=f"bad metadata: {exc}"
            )
        finally:
            zero(dek.plaintext)
            if erasure_key is not None:
                zero(erasure_key)
        await self._audit_key_issued(header, caller)
        return crypto_pb2.PreparedSeal(
            object_id=meta.object_id, status=Status.PREPARE_STATUS_READY, header=header.encode(), content_key=key
        )

    async def _describe_stored(self, object_id: str) -> crypto_pb2.ObjectDescription | None:
        """The stored object's description; None if it is gone or unreadable (then sealed anew:
        a second put of an id already stored is harmless, each copy opens to the same plaintext)."""
        try:
            f = await self._store_io(self._store.open_read, object_id)
        except FileNotFoundError:
            return None
        try:
            desc, _, _ = await self._store_io(self._describe_file, f)
        except fmt.SealedFormatError:
            log.error("stored object unreadable, sealing it again", extra={"object_id": object_id})
            return None
        finally:
            f.close()
        return desc

    async def _audit_key_issued(self, header: fmt.SealedHeader, caller: str) -> None:
        try:
            await self._audit.emit(
                Action.AUDIT_ACTION_OBJECT_SEALED,
                Outcome.AUDIT_OUTCOME_SUCCESS,
                caller,
                study_instance_uid=header.study_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                object_id=header.object_id,
                patient_ref=header.erasure_key_ref,
                details={"key_name": header.key_name, "key_version": str(header.key_version), "sealed_by": caller},
                # Same id when a seal is retried: the audit store records the object's sealing once.
                event_id=stable_event_id("sealed", header.object_id),
            )
        except Exception as exc:
            log.exception("audit event for seal not delivered", extra={"object_id": header.object_id})
            # No key without its record: the caller retries.
            raise AuditUnavailable from exc

    # -- open -------------------------------------------------------------------------------

    async def _object_key(self, header: fmt.SealedHeader) -> bytes:
        """The chunks' key: the unwrapped DEK, mixed with the patient's erasure key if it has one."""
        dek = await self._keys.unwrap(header.key_name, header.wrapped_dek)
        try:
            erasure = await self._keys.erasure_key_for_open(header.erasure_key_ref) if header.erasure_key_ref else None
            try:
                return fmt.content_key(dek, erasure, header)
            finally:
                if erasure is not None:
                    zero(erasure)
        finally:
            zero(dek)

    async def Open(
        self, request: crypto_pb2.OpenRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[crypto_pb2.OpenResponse]:
        actor = request.on_behalf_of or _caller(context)
        f, desc, header, header_len = await self._open_existing(request.object_id, context)
        outcome, reason = Outcome.AUDIT_OUTCOME_FAILURE, ""
        try:
            try:
                key = await self._object_key(header)
            except VaultUnavailable as exc:
                reason = "key service unavailable"
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except WrappedKeyRejected as exc:
                reason = "wrapped key rejected"
                await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            except ObjectErased:
                reason = "object erased"
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "object erased (its patient's key was destroyed)"
                )
            try:
                if request.offset or request.length:
                    # Like an HTTP byte range: a range running past the end is cut at the end.
                    if request.offset > desc.plaintext_size:
                        reason = "range outside object"
                        await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset beyond the end of the object")
                    available = desc.plaintext_size - request.offset
                    length = min(request.length, available) if request.length else available
                    chunks = fmt.iter_range(key, header, header_len, f, request.offset, length)
                else:
                    f.seek(header_len)
                    chunks = fmt.open_stream(key, header, f)
                # A remote store's chunks come off the loop about a megabyte per hand-off.
                budget = OPEN_BATCH_BYTES if self._store.reads_block else 0
                while batch := await self._store_io(_take, chunks, budget):
                    for chunk in batch:
                        BYTES.labels("crypto", "open").inc(len(chunk))
                        for piece in _pieces(chunk):
                            yield crypto_pb2.OpenResponse(data=piece)
            except fmt.SealedRangeError as exc:
                reason = "range outside object"
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            except fmt.SealedFormatError as exc:
                reason = "authentication failed"
                log.error("sealed object failed authentication", extra={"object_id": desc.object_id})
                await context.abort(
                    grpc.StatusCode.DATA_LOSS, f"sealed object failed authentication: {type(exc).__name__}"
                )
            outcome = Outcome.AUDIT_OUTCOME_SUCCESS
        finally:
            f.close()
            await self._audit.emit(
                Action.AUDIT_ACTION_OBJECT_OPENED,
                outcome,
                actor,
                study_instance_uid=desc.study_instance_uid,
                sop_instance_uid=desc.sop_instance_uid,
                object_id=desc.object_id,
                patient_ref=desc.erasure_key_ref,
                reason=reason,
                details={"caller": _caller(context), "offset": str(request.offset), "length": str(request.length)},
            )

    # -- key management ---------------------------------------------------------------------

    @staticmethod
    def _key_status(v: KeyVersions) -> crypto_pb2.KeyStatus:
        return crypto_pb2.KeyStatus(
            key_name=v.key_name,
            latest_version=v.latest,
            min_decryption_version=v.min_decryption,
            min_encryption_version=v.min_encryption,
        )

    async def GetKeyStatus(
        self, request: crypto_pb2.KeyStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.KeyStatus:
        try:
            return self._key_status(await self._keys.status())
        except VaultUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def RotateKey(
        self, request: crypto_pb2.RotateKeyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> crypto_pb2.KeyStatus:
        try:
            versions = await self._keys.rotate()
        except VaultUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        await self._audit.emit(
            Action.AUDIT_ACTION_KEY_ROTATED,
            Outcome.AUDIT_OUTCOME_SUCCESS,
            _caller(context),
            details={"key_name": versions.key_name, "latest_version": str(versions.latest)},
        )
        log.info("key rotated", extra={"key_name": versions.key_name, "latest_version": versions.latest})
        return self._key_status(versions)

    async def Rewrap(
        self, request: crypto_pb2.RewrapRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[crypto_pb2.RewrapProgress]:
        for object_id in request.object_ids:
            try:
                validate_object_id(object_id)
            except InvalidObjectId as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ids = list(request.object_ids) or await self._store_io(lambda: list(self._store.object_ids()))
        try:
            async for progress in self._rewrapper.run(ids, _caller(context)):
                yield progress
        except VaultUnavailable as exc:
            # Safe to resume: finished objects are skipped next time.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
