"""Storage Commitment Push Model SCP (PS3.4 Annex J) at the gateway's DIMSE AE.

A modality asks (N-ACTION) whether the instances it sent are safely kept before it deletes its
own copies. The answer (N-EVENT-REPORT) commits an instance only once the study index has
it: by then it was validated, sealed, stored, announced on `dicom.stored` and audited. The
gateway answers rather than ingest because the index is here; ingest knows only what its own
replica stored.

The report goes out after the N-ACTION response has been sent (PS3.4 J.3.3). It uses the same
association while the modality keeps it open; otherwise a new one to the peer's `store_scp`,
with the peer's certificate pinned as for C-MOVE. Instances not yet in the index are waited
for up to ``wait_s`` and then reported failed. The modality keeps its copy and may ask again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role
from pynetdicom.association import Association
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from dicomsafe.common.metrics import DIMSE_REQUESTS
from dicomsafe.common.tls import TlsConfig
from dicomsafe.dimse.associations import NOT_AUTHORISED, SUCCESS, AssociationGate, client_context
from dicomsafe.dimse.peers import Peer
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway.commitment")

# The well-known SOP Instance of the push model (PS3.4 J.3.5).
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1
ALL_COMMITTED, SOME_FAILED = 1, 2
# PS3.4 J.3.2.1.2 failure reasons.
NO_SUCH_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
INVALID_ARGUMENT = 0x0115  # the request names no instance, or one without its UIDs
NO_SUCH_ACTION = 0x0123
_POLL_S = 0.5


@dataclass(frozen=True)
class Request:
    transaction_uid: str
    # (SOP Class UID, SOP Instance UID) as the modality named them.
    refs: tuple[tuple[str, str], ...]


def parse_request(info: Dataset | None) -> Request | None:
    """The transaction and its references, or None when the Action Information is unusable."""
    if info is None or not str(info.get("TransactionUID", "")).strip():
        return None
    refs = []
    for item in info.get("ReferencedSOPSequence", []):
        sop_class, sop = str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", ""))
        if not sop_class or not sop:
            return None
        refs.append((sop_class, sop))
    if not refs:
        return None
    return Request(str(info.TransactionUID), tuple(refs))


def report(request: Request, stored: dict[str, str]) -> tuple[int, Dataset]:
    """The event type and Event Information for what the index holds."""
    info = Dataset()
    info.TransactionUID = request.transaction_uid
    committed, failed = [], []
    for sop_class, sop in request.refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        if sop not in stored:
            item.FailureReason = NO_SUCH_INSTANCE
            failed.append(item)
        elif stored[sop] and stored[sop] != sop_class:
            item.FailureReason = CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            committed.append(item)
    if committed:
        info.ReferencedSOPSequence = committed
    if failed:
        info.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), info


class CommitmentScp:
    def __init__(
        self,
        gate: AssociationGate,
        index: StudyIndex,
        tls: TlsConfig,
        ae_title: str,
        wait_s: float = 60.0,
    ) -> None:
        self._gate = gate
        self._index = index
        self._tls = tls
        self._ae_title = ae_title
        self._wait_s = wait_s
        # Requests answered, waiting for their N-ACTION response to go out (by message id).
        self._pending: dict[tuple[int, int], tuple[Peer, Request]] = {}
        self._lock = threading.Lock()

    def on_action(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """EVT_N_ACTION: accept the request; the report follows once the response is sent."""
        admitted = self._gate.admitted(event.assoc)
        if admitted is None or "store" not in admitted.peer.services:
            DIMSE_REQUESTS.labels("commit", "not_authorised").inc()
            return NOT_AUTHORISED, None
        primitive = event.request
        if event.action_type != REQUEST_COMMITMENT:
            DIMSE_REQUESTS.labels("commit", "refused").inc()
            return NO_SUCH_ACTION, None
        request = parse_request(event.action_information)
        if request is None:
            DIMSE_REQUESTS.labels("commit", "refused").inc()
            return INVALID_ARGUMENT, None
        with self._lock:
            self._pending[(id(event.assoc), int(primitive.MessageID or 0))] = (admitted.peer, request)
        return SUCCESS, None

    def on_sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT: once an N-ACTION response is out, its report may follow."""
        message = event.message
        if not isinstance(message, N_ACTION_RSP):
            return
        primitive = message.message_to_primitive()
        if not isinstance(primitive, N_ACTION):
            return
        key = (id(event.assoc), int(primitive.MessageIDBeingRespondedTo or 0))
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None:
            return
        peer, request = pending
        threading.Thread(
            target=self._report, args=(event.assoc, peer, request), name="commitment-report", daemon=True
        ).start()

    def _report(self, assoc: Association, peer: Peer, request: Request) -> None:
        try:
            stored = self._gate.wait(self._wait_for(request), self._wait_s + 30)
        except Exception as exc:  # noqa: BLE001 - nothing committed; the modality asks again
            log.warning("commitment not checked", extra={"calling_ae": peer.ae_title, "error": type(exc).__name__})
            stored = {}
        event_type, info = report(request, stored)
        sent = False
        if assoc.is_established:
            sent = self._send(assoc, info, event_type)
        if not sent and peer.store_scp is not None:
            sent = self._send_on_new_association(peer, info, event_type)
        outcome = "success" if sent and event_type == ALL_COMMITTED else "refused" if sent else "retry_later"
        DIMSE_REQUESTS.labels("commit", outcome).inc()
        if not sent:
            log.warning("commitment report not delivered", extra={"calling_ae": peer.ae_title})

    async def _wait_for(self, request: Request) -> dict[str, str]:
        wanted = [sop for _, sop in request.refs]
        deadline = time.monotonic() + self._wait_s
        while True:
            stored = await self._index.stored_classes(wanted)
            if len(stored) == len(set(wanted)) or time.monotonic() > deadline:
                return stored
            await asyncio.sleep(_POLL_S)

    @staticmethod
    def _send(assoc: Association, info: Dataset, event_type: int) -> bool:
        answer = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        return answer is not None and int(getattr(answer, "Status", -1)) == SUCCESS

    def _send_on_new_association(self, peer: Peer, info: Dataset, event_type: int) -> bool:
        assert peer.store_scp is not None
        host, port = peer.store_scp
        ae = AE(ae_title=self._ae_title)
        # We act as the SOP class's SCP on an association we request (PS3.4 J.3.3).
        assoc = ae.associate(
            host,
            port,
            ae_title=peer.ae_title,
            contexts=[build_context(StorageCommitmentPushModel)],
            ext_neg=[build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)],
            tls_args=(client_context(self._tls, peer), host),
        )
        if not assoc.is_established:
            return False
        try:
            return self._send(assoc, info, event_type)
        finally:
            assoc.release()
