"""ingest's DIMSE listener: modalities and PACS send C-ECHO and C-STORE over DICOM TLS.

Every received instance takes the same store path as a `dicom.ingest` record and a STOW-RS
part (dicomsafe.storage.instance_storer): validated, sealed, announced on `dicom.stored` and
audited before the C-STORE response says success. So a success the modality sees is an
instance it may delete; anything else (refused, or retry later) leaves the modality holding it.

Associations are admitted, audited and bridged to ingest's event loop by
dicomsafe.dimse.associations, as the gateway's query/retrieve listener does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.kafka import TransientError
from dicomsafe.common.metrics import DIMSE_REQUESTS
from dicomsafe.common.tls import TlsConfig
from dicomsafe.dimse.associations import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SUCCESS,
    DimseServer,
    ListenerSettings,
    SupportedContext,
    status,
)
from dicomsafe.storage.instance_storer import InstanceStorer, Refused, StoreContext

log = logging.getLogger("dicomsafe.ingest.dimse")


@dataclass(frozen=True)
class DimseSettings:
    listener: ListenerSettings
    # Largest instance accepted (pynetdicom holds a received data set in memory, never on disk:
    # spooling it to a temporary file would put plaintext on disk).
    max_instance_bytes: int
    # How long a C-STORE waits for its instance to be sealed, announced and audited.
    store_timeout_s: float


class DimseListener:
    def __init__(
        self, settings: DimseSettings, tls: TlsConfig | None, storer: InstanceStorer, audit: AuditEmitter
    ) -> None:
        self._settings = settings
        self._storer = storer
        self._server = DimseServer(settings.listener, tls, audit)
        self._gate = self._server.gate

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    async def start(self) -> None:
        contexts = [SupportedContext(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]
        await self._server.start(contexts, [(evt.EVT_C_STORE, self._on_store)])

    async def stop(self) -> None:
        """An aborted C-STORE was not acknowledged: its sender still holds the instance."""
        await self._server.stop()

    # -- services ---------------------------------------------------------------------------

    def _on_store(self, event: Event) -> Dataset:
        admitted = self._gate.admitted(event.assoc)
        message_id = str(getattr(event.request, "MessageID", ""))
        if admitted is None:
            DIMSE_REQUESTS.labels("store", "not_authorised").inc()
            return status(NOT_AUTHORISED, "association not admitted")
        peer = admitted.peer
        ctx = StoreContext(
            source=f"dimse:{peer.ae_title}",
            request_id=f"{admitted.association_id}/{message_id}",
            trace_id="",
            actor=peer.principal,
            position=f"dimse/{peer.ae_title}/{admitted.association_id}/{message_id}",
        )
        timeout = self._settings.store_timeout_s
        try:
            if "store" not in peer.services:
                self._gate.wait(
                    self._storer.record_refusal(ctx, Refused("not_authorised", "peer may not store")), timeout
                )
                DIMSE_REQUESTS.labels("store", "not_authorised").inc()
                return status(NOT_AUTHORISED, "this peer may not store")
            data = event.encoded_dataset(include_meta=True)
            try:
                self._gate.wait(self._storer.store(data, ctx, max_bytes=self._settings.max_instance_bytes), timeout)
            except Refused as refusal:
                self._gate.wait(self._storer.record_refusal(ctx, refusal), timeout)
                DIMSE_REQUESTS.labels("store", "refused").inc()
                log.warning("C-STORE refused", extra={"calling_ae": peer.ae_title, "code": refusal.code})
                return status(CANNOT_UNDERSTAND, f"{refusal.code}: {refusal.reason}")
        except TransientError as exc:
            DIMSE_REQUESTS.labels("store", "retry_later").inc()
            log.warning("C-STORE not stored, sender to retry", extra={"calling_ae": peer.ae_title, "reason": str(exc)})
            return status(OUT_OF_RESOURCES, "temporarily unavailable, send again later")
        except Exception as exc:  # noqa: BLE001
            # Unexpected: the instance is not acknowledged, so the sender still holds it. The
            # type only: a parser's message may quote the data set's values.
            log.error("C-STORE failed", extra={"calling_ae": peer.ae_title, "error": type(exc).__name__})
            DIMSE_REQUESTS.labels("store", "retry_later").inc()
            return status(OUT_OF_RESOURCES, "internal error, send again later")
        DIMSE_REQUESTS.labels("store", "success").inc()
        return status(SUCCESS)
