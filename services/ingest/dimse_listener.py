"""ingest's DIMSE listener: modalities and PACS send C-ECHO and C-STORE over DICOM TLS.

Every received instance takes the same store path as a `dicom.ingest` record and a STOW-RS
part (dicomsafe.storage.instance_storer): validated, sealed, announced on `dicom.stored` and
audited before the C-STORE response says success. So a success the modality sees is an
instance it may delete; anything else (refused, or retry later) leaves the modality holding it.

pynetdicom runs each association in its own thread with blocking handlers. The handlers hand
the work to ingest's event loop and wait for it, so the listener adds no second Kafka producer
or crypto channel.

Associations are admitted by services.ingest.dimse_peers. Each one is audited, accepted or
refused, before the requestor hears the answer, and so is each failed TLS handshake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.kafka import TransientError
from dicomsafe.common.metrics import DIMSE_ASSOCIATIONS, DIMSE_REQUESTS
from dicomsafe.common.tls import TlsConfig
from dicomsafe.storage.instance_storer import InstanceStorer, Refused, StoreContext
from dicomsafe.v1 import audit_pb2
from services.ingest.dimse_peers import CertificateIdentity, Peer, PeerDirectory, Refusal

log = logging.getLogger("dicomsafe.ingest.dimse")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome

UNKNOWN_PEER = "unknown-peer"
# PS3.4 / PS3.7 C.4 statuses of our C-STORE and C-ECHO responses.
SUCCESS = 0x0000
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700  # the sender keeps the instance and retries later
CANNOT_UNDERSTAND = 0xC000  # refused for good: the Error Comment says why
# A-ASSOCIATE-RJ rejected-transient by the service provider (presentation), temporary
# congestion: what a peer hears when its association cannot be audited right now.
_REJECT_TRANSIENT = (0x02, 0x03, 0x01)
# Error Comment is LO: at most 64 characters.
_COMMENT_MAX = 64


@dataclass(frozen=True)
class DimseSettings:
    host: str
    port: int
    ae_title: str
    peers: PeerDirectory
    # Largest instance accepted (pynetdicom holds a received data set in memory, never on disk:
    # spooling it to a temporary file would put plaintext on disk).
    max_instance_bytes: int
    # How long a C-STORE waits for its instance to be sealed, announced and audited.
    store_timeout_s: float
    # A client that connects and stalls its TLS handshake holds the accept loop this long.
    handshake_timeout_s: float = 10.0
    max_associations: int = 16
    max_pdu_bytes: int = 1024 * 1024
    # How long stop() lets associations in progress finish before aborting them.
    drain_s: float = 10.0


@dataclass(frozen=True)
class _Admitted:
    peer: Peer
    # Names the association in audit positions and request ids (distinct per association).
    association_id: str


class _HandshakeCheckingContext(ssl.SSLContext):
    """A server context whose handshakes are bounded in time and whose failures are reported:
    pynetdicom handshakes inside its accept loop and drops a failure without a word."""

    on_failure: Callable[[str, str], None]
    handshake_timeout_s: float

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        try:
            address = str(sock.getpeername()[0])
        except OSError:
            address = ""
        sock.settimeout(self.handshake_timeout_s)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            self.on_failure(address, _handshake_reason(exc))
            raise
        # pynetdicom polls the socket itself; a blocking socket is what it expects.
        wrapped.settimeout(None)
        return wrapped


def _handshake_reason(exc: BaseException) -> str:
    # OpenSSL's reason code ("CERTIFICATE_VERIFY_FAILED", "UNSUPPORTED_PROTOCOL"), never a
    # certificate's contents.
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(exc).__name__}"


def server_context(tls: TlsConfig, allow_tls12: bool) -> _HandshakeCheckingContext:
    """Mutual TLS against our CA. TLS 1.3 only, unless some configured peer has the 1.2
    exception; then only that peer may use 1.2 (dimse_peers checks it per association)."""
    ctx = _HandshakeCheckingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        # For 1.2, forward secrecy and AEAD only (BCP 195); 1.3's suites are all of that kind.
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class DimseListener:
    def __init__(self, settings: DimseSettings, tls: TlsConfig, storer: InstanceStorer, audit: AuditEmitter) -> None:
        self._settings = settings
        self._tls = tls
        self._storer = storer
        self._audit = audit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._admitted: weakref.WeakKeyDictionary[Association, _Admitted] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the DIMSE listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self._settings
        # pynetdicom logs at INFO what peers send; only its warnings reach our logs.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ctx = server_context(self._tls, s.peers.any_tls12)
        ctx.on_failure = self._handshake_failed
        ctx.handshake_timeout_s = s.handshake_timeout_s
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = await asyncio.to_thread(
            ae.start_server, (s.host, s.port), block=False, ssl_context=ctx, evt_handlers=handlers
        )
        self._ae, self._server = ae, server
        log.info("DIMSE listener started", extra={"address": f"{s.host}:{self.address[1]}", "ae_title": s.ae_title})

    async def stop(self) -> None:
        """No new associations; those in progress get ``drain_s`` to finish, then are aborted
        (an aborted C-STORE was not acknowledged: its sender still holds the instance)."""
        if self._server is None or self._ae is None:
            return
        await asyncio.to_thread(self._shutdown, self._server, self._ae)
        self._server = None

    def _shutdown(self, server: ThreadedAssociationServer, ae: AE) -> None:
        server.shutdown()
        deadline = time.monotonic() + self._settings.drain_s
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in ae.active_associations:
            assoc.abort()

    # -- bridging to the event loop ---------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        if self._loop is None:
            raise RuntimeError("the DIMSE listener is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        future = self._submit(coro)
        try:
            return future.result(timeout_s)
        except FutureTimeout:
            future.cancel()
            raise TransientError("timed out") from None

    def _audit_association(
        self, outcome: audit_pb2.AuditOutcome.ValueType, actor: str, reason: str, details: dict[str, str]
    ) -> Any:
        return self._audit.emit(Action.AUDIT_ACTION_PEER_ASSOCIATION, outcome, actor, reason=reason, details=details)

    # -- associations -----------------------------------------------------------------------

    def _handshake_failed(self, address: str, reason: str) -> None:
        # In the accept loop: the record is sent without holding up the next connection.
        DIMSE_ASSOCIATIONS.labels("handshake_failed").inc()
        log.warning("DIMSE TLS handshake failed", extra={"peer_address": address, "reason": reason})
        details = {"address": address, "called_ae": self._settings.ae_title}
        future = self._submit(self._audit_association(Outcome.AUDIT_OUTCOME_FAILURE, UNKNOWN_PEER, reason, details))
        future.add_done_callback(_log_undelivered)

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(getattr(request, "calling_ae_title", "") or "").strip()
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        address = str(assoc.requestor.address)
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        tls_version, cert = "", None
        if isinstance(sock, ssl.SSLSocket):
            tls_version, cert = sock.version() or "", sock.getpeercert()
        details = {"calling_ae": calling, "called_ae": called, "address": address, "tls_version": tls_version}
        verdict: Peer | Refusal
        if called != self._settings.ae_title:
            verdict = Refusal("called AE title is not this listener's", 0x01, 0x01, 0x07)
        else:
            verdict = self._settings.peers.admit(calling, address, CertificateIdentity.from_peercert(cert), tls_version)
        if isinstance(verdict, Refusal):
            DIMSE_ASSOCIATIONS.labels("refused").inc()
            log.warning("DIMSE association refused", extra={"calling_ae": calling, "reason": verdict.reason})
            try:
                denied = self._audit_association(Outcome.AUDIT_OUTCOME_DENIED, UNKNOWN_PEER, verdict.reason, details)
                self._wait(denied, 30)
            except Exception:  # noqa: BLE001 - refused either way; the log has it
                log.error("audit event of a refused association not delivered", extra={"calling_ae": calling})
            self._reject(assoc, (verdict.result, verdict.source, verdict.diagnostic))
            return
        try:
            self._wait(self._audit_association(Outcome.AUDIT_OUTCOME_SUCCESS, verdict.name, "", details), 30)
        except Exception:  # noqa: BLE001
            # No association without its record: the peer is told to come back later.
            log.error("audit unavailable, DIMSE association turned away", extra={"calling_ae": calling})
            DIMSE_ASSOCIATIONS.labels("refused").inc()
            self._reject(assoc, _REJECT_TRANSIENT)
            return
        DIMSE_ASSOCIATIONS.labels("accepted").inc()
        with self._lock:
            self._admitted[assoc] = _Admitted(verdict, uuid.uuid4().hex)

    @staticmethod
    def _reject(assoc: Association, rsd: tuple[int, int, int]) -> None:
        assoc.acse.send_reject(*rsd)
        # As pynetdicom's own rejections do: the DUL sends the A-ASSOCIATE-RJ, then stops.
        assoc.kill()

    def _admitted_of(self, assoc: Association) -> _Admitted | None:
        with self._lock:
            return self._admitted.get(assoc)

    # -- services ---------------------------------------------------------------------------

    def _on_echo(self, event: Event) -> int:
        admitted = self._admitted_of(event.assoc)
        if admitted is None or "echo" not in admitted.peer.services:
            DIMSE_REQUESTS.labels("echo", "not_authorised").inc()
            return NOT_AUTHORISED
        DIMSE_REQUESTS.labels("echo", "success").inc()
        return SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        admitted = self._admitted_of(event.assoc)
        message_id = str(getattr(event.request, "MessageID", ""))
        if admitted is None:
            DIMSE_REQUESTS.labels("store", "not_authorised").inc()
            return _status(NOT_AUTHORISED, "association not admitted")
        peer = admitted.peer
        ctx = StoreContext(
            source=f"dimse:{peer.ae_title}",
            request_id=f"{admitted.association_id}/{message_id}",
            trace_id="",
            actor=peer.name,
            position=f"dimse/{peer.ae_title}/{admitted.association_id}/{message_id}",
        )
        timeout = self._settings.store_timeout_s
        try:
            if "store" not in peer.services:
                self._wait(self._storer.record_refusal(ctx, Refused("not_authorised", "peer may not store")), timeout)
                DIMSE_REQUESTS.labels("store", "not_authorised").inc()
                return _status(NOT_AUTHORISED, "this peer may not store")
            data = event.encoded_dataset(include_meta=True)
            try:
                self._wait(self._storer.store(data, ctx, max_bytes=self._settings.max_instance_bytes), timeout)
            except Refused as refusal:
                self._wait(self._storer.record_refusal(ctx, refusal), timeout)
                DIMSE_REQUESTS.labels("store", "refused").inc()
                log.warning("C-STORE refused", extra={"calling_ae": peer.ae_title, "code": refusal.code})
                return _status(CANNOT_UNDERSTAND, f"{refusal.code}: {refusal.reason}")
        except TransientError as exc:
            DIMSE_REQUESTS.labels("store", "retry_later").inc()
            log.warning("C-STORE not stored, sender to retry", extra={"calling_ae": peer.ae_title, "reason": str(exc)})
            return _status(OUT_OF_RESOURCES, "temporarily unavailable, send again later")
        except Exception as exc:  # noqa: BLE001
            # Unexpected: the instance is not acknowledged, so the sender still holds it. The
            # type only: a parser's message may quote the data set's values.
            log.error("C-STORE failed", extra={"calling_ae": peer.ae_title, "error": type(exc).__name__})
            DIMSE_REQUESTS.labels("store", "retry_later").inc()
            return _status(OUT_OF_RESOURCES, "internal error, send again later")
        DIMSE_REQUESTS.labels("store", "success").inc()
        return _status(SUCCESS)


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_COMMENT_MAX]
    return status


def _log_undelivered(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("audit event of a failed TLS handshake not delivered")
