"""Key rotation follow-up: upgrade every stored wrapped DEK to the latest Transit key version.

Only headers change: Vault re-encrypts the wrapped DEK (the plaintext DEK never leaves
Vault), the new header is written with the object's chunks copied byte for byte, and the
chunks' associated data excludes the key fields, so they stay valid. Resumable: objects
already at the target version are skipped, so an interrupted run is simply started again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import ObjectStore, rewrite_header
from dicomsafe.v1 import audit_pb2, crypto_pb2
from services.crypto.vault_keys import TransitKeys, WrappedKeyRejected, key_version_of

log = logging.getLogger("dicomsafe.crypto.rewrap")

PROGRESS_EVERY = 100


class Rewrapper:
    def __init__(self, store: ObjectStore, keys: TransitKeys, audit: AuditEmitter) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit

    async def run(self, object_ids: Sequence[str], actor: str) -> AsyncIterator[crypto_pb2.RewrapProgress]:
        status = await self._keys.status()
        progress = crypto_pb2.RewrapProgress(target_version=status.latest, total=len(object_ids))
        yield progress
        before: Counter[int] = Counter()
        for object_id in object_ids:
            progress.scanned += 1
            progress.last_object_id = object_id
            try:
                version = await self._rewrap_one(object_id, status.latest, actor)
            except (fmt.SealedFormatError, WrappedKeyRejected, OSError) as exc:
                # One damaged object must not stop the job; it is reported and left as it was.
                log.error("rewrap failed", extra={"object_id": object_id, "error": type(exc).__name__})
                progress.failed += 1
                progress.failed_object_ids.append(object_id)
                continue
            before[version] += 1
            if version >= status.latest:
                progress.already_current += 1
            else:
                progress.rewrapped += 1
            if progress.scanned % PROGRESS_EVERY == 0:
                yield progress
        progress.done = True
        for version, count in before.items():
            progress.versions_before[version] = count
        yield progress

    def _read_header(self, object_id: str) -> tuple[fmt.SealedHeader, int, bytes]:
        with self._store.open_read(object_id) as f:
            header, header_len = fmt.read_header(f)
            f.seek(0)
            return header, header_len, f.read(header_len)

    async def _rewrap_one(self, object_id: str, target: int, actor: str) -> int:
        header, header_len, header_bytes = await asyncio.to_thread(self._read_header, object_id)
        if header.object_id != object_id:
            raise fmt.SealedObjectCorrupt("header names another object")
        if header.key_version >= target:
            return header.key_version
        wrapped = await self._keys.rewrap(header.wrapped_dek)
        new_header = fmt.rewrap_header(header_bytes, header.key_name, key_version_of(wrapped), wrapped)
        await asyncio.to_thread(rewrite_header, self._store, object_id, new_header, header_len)
        await self._audit.emit(
            audit_pb2.AuditAction.AUDIT_ACTION_OBJECT_REWRAPPED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            actor,
            study_instance_uid=header.study_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            object_id=object_id,
            patient_ref=header.erasure_key_ref,
            details={"from_version": str(header.key_version), "to_version": str(key_version_of(wrapped))},
        )
        return header.key_version
