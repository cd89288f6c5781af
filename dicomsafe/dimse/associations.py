"""Admitting associations to a DIMSE listener, the same way for ingest's storage AE and the
gateway's query/retrieve AE.

Mutual TLS 1.3 against our CA (1.2 only for a peer with that documented exception); then the
requestor's calling AE title, certificate identity, source address and TLS version must match
one configured peer (dicomsafe.dimse.peers). Each association is audited, accepted or refused,
before the requestor hears the answer, and so is each failed TLS handshake: no association
without its record, so with the audit trail down peers are told to come back later.

pynetdicom runs each association in its own thread with blocking handlers. ``AssociationGate``
hands their work to the service's event loop and waits for it, so a listener adds no second
Kafka producer or gRPC channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.config import ConfigError, host_port
from dicomsafe.common.kafka import TransientError
from dicomsafe.common.metrics import DIMSE_ASSOCIATIONS, DIMSE_REQUESTS
from dicomsafe.common.tls import TlsConfig
from dicomsafe.dimse.peers import CertificateIdentity, Peer, PeerDirectory, Refusal
from dicomsafe.v1 import audit_pb2

log = logging.getLogger("dicomsafe.dimse")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome

UNKNOWN_PEER = "unknown-peer"
# PS3.7 C.4 / PS3.4 statuses shared by the services.
SUCCESS = 0x0000
NOT_AUTHORISED = 0x0124
OUT_OF_RESOURCES = 0xA700  # the sender keeps the instance and retries later
CANNOT_UNDERSTAND = 0xC000  # refused for good: the Error Comment says why
# A-ASSOCIATE-RJ rejected-transient by the service provider (presentation), temporary
# congestion: what a peer hears when its association cannot be audited right now.
_REJECT_TRANSIENT = (0x02, 0x03, 0x01)
_CALLED_AE_UNKNOWN = (0x01, 0x01, 0x07)
# Error Comment is LO: at most 64 characters.
_COMMENT_MAX = 64
_AUDIT_WAIT_S = 30.0


@dataclass(frozen=True)
class ListenerSettings:
    """Where a DIMSE listener answers, as which AE, and whom it admits."""

    host: str
    port: int
    ae_title: str
    peers: PeerDirectory
    # A client that connects and stalls its TLS handshake holds the accept loop this long.
    handshake_timeout_s: float = 10.0
    max_associations: int = 16
    max_pdu_bytes: int = 1024 * 1024
    # How long stop() lets associations in progress finish before aborting them.
    drain_s: float = 10.0


def listener_settings(
    prefix: str, *, bind: str, peers_file: str, ae_title: str, max_associations: int
) -> ListenerSettings | None:
    """A listener from a service's ``<prefix>_DIMSE_*`` settings (each service reads its own,
    by name, so deployment checks see them): a bind address turns it on, and then it needs
    its peers file."""
    if not bind:
        return None
    try:
        host, port = host_port(bind, "0.0.0.0")  # noqa: S104 - a listener for peers on other hosts
    except ConfigError as exc:
        raise ConfigError(f"{prefix}_DIMSE_BIND: {exc}") from None
    if not peers_file:
        raise ConfigError(f"{prefix}_DIMSE_BIND needs {prefix}_DIMSE_PEERS_FILE (the peers it admits)")
    return ListenerSettings(
        host=host,
        port=port,
        ae_title=ae_title,
        peers=PeerDirectory.load(Path(peers_file)),
        max_associations=max_associations,
    )


@dataclass(frozen=True)
class Admitted:
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
        _no_delay(sock)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            self.on_failure(address, _handshake_reason(exc))
            raise
        # pynetdicom polls the socket itself; a blocking socket is what it expects.
        wrapped.settimeout(None)
        return wrapped


def _no_delay(sock: socket.socket) -> None:
    """DIMSE is request/response: with Nagle on, each message's last segment waits for the
    peer's delayed ACK (40 ms on Linux), which capped a modality at ~20 instances/s."""
    with contextlib.suppress(OSError):  # a peer already gone: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _handshake_reason(exc: BaseException) -> str:
    # OpenSSL's reason code ("CERTIFICATE_VERIFY_FAILED", "UNSUPPORTED_PROTOCOL"), never a
    # certificate's contents.
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(exc).__name__}"


def _tls_floor(ctx: ssl.SSLContext, allow_tls12: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    if allow_tls12:
        # For 1.2, forward secrecy and AEAD only (BCP 195); 1.3's suites are all of that kind.
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")


def server_context(tls: TlsConfig, allow_tls12: bool) -> _HandshakeCheckingContext:
    """Mutual TLS against our CA. TLS 1.3 only, unless some configured peer has the 1.2
    exception; then only that peer may use 1.2 (checked per association on admission)."""
    ctx = _HandshakeCheckingContext(ssl.PROTOCOL_TLS_SERVER)
    _tls_floor(ctx, allow_tls12)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _PinnedSocket(ssl.SSLSocket):
    """A client socket that, once the handshake has verified the chain, also requires the
    certificate to name the expected peer (CN or URI/DNS SAN, as admission matches it)."""

    expected_name = ""

    def do_handshake(self, block: bool = False) -> None:
        _no_delay(self)
        super().do_handshake(block)
        if self.expected_name not in CertificateIdentity.from_peercert(self.getpeercert()).names:
            self.close()
            raise ssl.SSLError("the destination's certificate does not name the configured peer")


def client_context(tls: TlsConfig, destination: Peer) -> ssl.SSLContext:
    """For our own association to ``destination`` (a C-MOVE): our certificate, our CA, the TLS
    floor of that peer, and its certificate identity pinned."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls_floor(ctx, destination.allow_tls12)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.load_verify_locations(cafile=tls.ca_file)
    # Peers are named by certificate identity, not by DNS name: the pin below replaces the
    # hostname check (the chain is still verified against our CA).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslsocket_class = type("PinnedSocket", (_PinnedSocket,), {"expected_name": destination.certificate})
    return ctx


def status(code: int, comment: str = "") -> Dataset:
    answer = Dataset()
    answer.Status = code
    if comment:
        answer.ErrorComment = comment[:_COMMENT_MAX]
    return answer


class AssociationGate:
    """Admission, audit and the bridge to the event loop for one listener's associations."""

    def __init__(self, ae_title: str, peers: PeerDirectory, audit: AuditEmitter) -> None:
        self._ae_title = ae_title
        self._peers = peers
        self._audit = audit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admitted: weakref.WeakKeyDictionary[Association, Admitted] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def tls_context(self, tls: TlsConfig, handshake_timeout_s: float) -> ssl.SSLContext:
        ctx = server_context(tls, self._peers.any_tls12)
        ctx.on_failure = self._handshake_failed
        ctx.handshake_timeout_s = handshake_timeout_s
        return ctx

    # -- bridging to the event loop ---------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        if self._loop is None:
            raise RuntimeError("the DIMSE listener is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def wait(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        """Run ``coro`` on the service's loop and wait for it; TransientError on timeout."""
        future = self.submit(coro)
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
        details = {"address": address, "called_ae": self._ae_title}
        future = self.submit(self._audit_association(Outcome.AUDIT_OUTCOME_FAILURE, UNKNOWN_PEER, reason, details))
        future.add_done_callback(_log_undelivered)

    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED: admit the association or reject it, audited either way first."""
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
        if called != self._ae_title:
            verdict = Refusal("called AE title is not this listener's", *_CALLED_AE_UNKNOWN)
        else:
            verdict = self._peers.admit(calling, address, CertificateIdentity.from_peercert(cert), tls_version)
        if isinstance(verdict, Refusal):
            DIMSE_ASSOCIATIONS.labels("refused").inc()
            log.warning("DIMSE association refused", extra={"calling_ae": calling, "reason": verdict.reason})
            try:
                denied = self._audit_association(Outcome.AUDIT_OUTCOME_DENIED, UNKNOWN_PEER, verdict.reason, details)
                self.wait(denied, _AUDIT_WAIT_S)
            except Exception:  # noqa: BLE001 - refused either way; the log has it
                log.error("audit event of a refused association not delivered", extra={"calling_ae": calling})
            _reject(assoc, (verdict.result, verdict.source, verdict.diagnostic))
            return
        try:
            self.wait(
                self._audit_association(Outcome.AUDIT_OUTCOME_SUCCESS, verdict.principal, "", details), _AUDIT_WAIT_S
            )
        except Exception:  # noqa: BLE001
            # No association without its record: the peer is told to come back later.
            log.error("audit unavailable, DIMSE association turned away", extra={"calling_ae": calling})
            DIMSE_ASSOCIATIONS.labels("refused").inc()
            _reject(assoc, _REJECT_TRANSIENT)
            return
        DIMSE_ASSOCIATIONS.labels("accepted").inc()
        with self._lock:
            self._admitted[assoc] = Admitted(verdict, uuid.uuid4().hex)

    def admitted(self, assoc: Association) -> Admitted | None:
        with self._lock:
            return self._admitted.get(assoc)

    def on_echo(self, event: Event) -> int:
        """EVT_C_ECHO: success for a peer granted "echo"."""
        admitted = self.admitted(event.assoc)
        if admitted is None or "echo" not in admitted.peer.services:
            DIMSE_REQUESTS.labels("echo", "not_authorised").inc()
            return NOT_AUTHORISED
        DIMSE_REQUESTS.labels("echo", "success").inc()
        return SUCCESS


class DimseServer:
    """One listener: a pynetdicom AE on DICOM TLS, its associations admitted by the gate."""

    def __init__(self, settings: ListenerSettings, tls: TlsConfig | None, audit: AuditEmitter) -> None:
        if tls is None:
            # DICOM TLS only: a peer is identified by its certificate, never by its AE title alone.
            raise ConfigError("the DIMSE listener needs TLS (TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE)")
        self.settings = settings
        self.gate = AssociationGate(settings.ae_title, settings.peers, audit)
        self.tls = tls
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the DIMSE listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def ae(self) -> AE:
        if self._ae is None:
            raise RuntimeError("the DIMSE listener is not started")
        return self._ae

    async def start(self, contexts: Iterable[SupportedContext], handlers: Sequence[EventHandlerType]) -> None:
        """Listen with these presentation contexts; EVT_REQUESTED and EVT_C_ECHO are the gate's."""
        self.gate.bind_loop(asyncio.get_running_loop())
        s = self.settings
        # pynetdicom logs at INFO what peers send; only its warnings reach our logs.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        for cx in contexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=cx.role, scp_role=cx.role)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ctx = self.gate.tls_context(self.tls, s.handshake_timeout_s)
        all_handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self.gate.on_requested),
            (evt.EVT_C_ECHO, self.gate.on_echo),
            *handlers,
        ]
        server = await asyncio.to_thread(
            ae.start_server, (s.host, s.port), block=False, ssl_context=ctx, evt_handlers=all_handlers
        )
        self._ae, self._server = ae, server
        log.info("DIMSE listener started", extra={"address": f"{s.host}:{self.address[1]}", "ae_title": s.ae_title})

    async def stop(self) -> None:
        """No new associations; those in progress get ``drain_s`` to finish, then are aborted."""
        if self._server is None or self._ae is None:
            return
        await asyncio.to_thread(_shutdown, self._server, self._ae, self.settings.drain_s)
        self._server = None


@dataclass(frozen=True)
class SupportedContext:
    abstract_syntax: str
    # Accept SCP/SCU role selection (the storage contexts of a C-GET, where the requestor is
    # the storage SCP); None leaves the default roles.
    role: bool | None = None


def _reject(assoc: Association, rsd: tuple[int, int, int]) -> None:
    assoc.acse.send_reject(*rsd)
    # As pynetdicom's own rejections do: the DUL sends the A-ASSOCIATE-RJ, then stops.
    assoc.kill()


def _shutdown(server: ThreadedAssociationServer, ae: AE, drain_s: float) -> None:
    server.shutdown()
    deadline = time.monotonic() + drain_s
    while ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    for assoc in ae.active_associations:
        assoc.abort()


def _log_undelivered(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("audit event of a failed TLS handshake not delivered")
