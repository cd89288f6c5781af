"""The gateway's DIMSE query/retrieve listener: C-FIND, C-GET and C-MOVE over DICOM TLS.

The read side of DIMSE lives where the read side of DICOMweb does: the study index, authz,
crypto's Open and the audit trail are the gateway's. ingest keeps the storage AE and never
holds a right to open sealed objects (least privilege).

A peer is admitted as on ingest's listener (dicomsafe.dimse.associations). Each request then
needs the service in the peer's entry ("find", "get", "move") and authz's decision for the
peer as a principal, ``dimse:<name>`` with roles from the policy file, exactly as QIDO-RS and
WADO-RS ask for a user: ``study.query`` for each study a C-FIND would answer with, and
``instance.read`` for each study a C-GET or C-MOVE would send. Studies not allowed are left
out. DIMSE has no de-identified release: a study the peer may see only de-identified is left
out too. Every query, every instance sent and every refusal is on the audit trail.

C-MOVE goes only to a destination the requesting peer's entry names, at the address the
destination's own entry gives, over mutual TLS with its certificate identity pinned.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, build_context, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomsafe.common.kafka import TransientError
from dicomsafe.common.metrics import DIMSE_REQUESTS
from dicomsafe.common.tls import TlsConfig
from dicomsafe.dimse.associations import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    DimseServer,
    ListenerSettings,
    SupportedContext,
    client_context,
    status,
)
from dicomsafe.dimse.peers import Peer
from dicomsafe.v1 import audit_pb2, crypto_pb2
from services.gateway.access import AuthzUnavailable, Verdict, Where, resource
from services.gateway.dicomweb_common import Backends
from services.gateway.storage_commitment import CommitmentScp
from services.gateway.study_index import MATCHABLE, Found, Level, Located, QueryError

log = logging.getLogger("dicomsafe.gateway.dimse")

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome

QUERY_ACTION = "study.query"
READ_ACTION = "instance.read"
PENDING = 0xFF00
CANCELLED = 0xFE00
# PS3.4 C.4.1.1.4 / C.4.2.1.5: the identifier does not fit the information model.
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = CANNOT_UNDERSTAND
# C-MOVE: the destination is not one this peer may move to (PS3.4 C.4.2.1.5).
MOVE_DESTINATION_UNKNOWN = 0xA801
LEVELS: Mapping[str, Level] = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
_PAGE = 200
# A C-MOVE proposes at most this many presentation contexts (PS3.8: 128 in all).
_MAX_CONTEXTS = 128
# Keys that carry no matching value of their own.
_NOT_MATCHING = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})
# Patient level (Patient Root): attributes of the patient, from any of their studies (by tag,
# as the index keeps DICOM JSON).
_PATIENT_ID = "00100020"
_PATIENT_TAGS = ("00100010", _PATIENT_ID, "00100030", "00100040")
_PATIENT_STUDIES = "00201200"

STORAGE_SOP_CLASSES = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]
_FIND_MODELS = (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)
_GET_MODELS = (PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet)
_MOVE_MODELS = (PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove)


@dataclass(frozen=True)
class QrSettings:
    listener: ListenerSettings
    # How long one step (a search with its checks, one instance opened) may take.
    call_timeout_s: float
    # Matches one C-FIND answers with; a query matching more is refused whole (A700) rather than
    # answered in part as if complete.
    max_matches: int = 1000
    # Instances one C-GET or C-MOVE sends.
    max_retrieve: int = 10000
    # How long a storage commitment waits for instances to reach the index before reporting
    # them failed (a modality's C-STORE and its commitment request may race the indexer).
    commitment_wait_s: float = 60.0


class Refusal(Exception):
    """A request refused before any result: the status and a PHI-free Error Comment."""

    def __init__(self, code: int, comment: str) -> None:
        super().__init__(comment)
        self.code = code
        self.comment = comment


@dataclass(frozen=True)
class Query:
    """A C-FIND identifier in the index's terms."""

    level: str  # PATIENT, STUDY, SERIES or IMAGE
    params: dict[str, str]
    # The identifier's elements: what each answer carries (empty where the index has no value).
    keys: tuple[DataElement, ...]


@dataclass(frozen=True)
class Release:
    """What a C-GET or C-MOVE sends: the allowed instances and, per study, the decision."""

    instances: tuple[Located, ...]
    verdicts: Mapping[str, Verdict]


def _text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def parse_query(identifier: Dataset) -> Query:
    """The level, the matching values the index can match on, and the return keys.

    Matching values on optional keys the index does not keep are ignored (PS3.4 C.2.2.2.2 lets
    an SCP treat them as return keys), so a peer never gets an error for asking more precisely.
    """
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level != "PATIENT" and level not in LEVELS:
        raise QueryError("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
    index_level: Level = LEVELS.get(level, "study")
    reachable = set(MATCHABLE["study"])
    if index_level in ("series", "instance"):
        reachable |= MATCHABLE["series"]
    if index_level == "instance":
        reachable |= MATCHABLE["instance"]
    params: dict[str, str] = {}
    keys: list[DataElement] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or element.VR == "SQ" or keyword in _NOT_MATCHING:
            continue
        keys.append(element)
        value = _text(element).strip()
        if value and keyword in reachable:
            params[keyword] = value
    return Query(level, params, tuple(keys))


def _answer(query: Query, attrs: Mapping[str, Any], ae_title: str) -> Dataset:
    """One match as the requested keys: the index's value of each, or the key left empty."""
    found = Dataset.from_json(dict(attrs))
    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 192"
    answer.QueryRetrieveLevel = query.level
    for key in query.keys:
        if key.tag in found:
            answer[key.tag] = found[key.tag]
        else:
            answer.add_new(key.tag, key.VR, None)
    answer.RetrieveAETitle = ae_title
    return answer


def _storage_contexts(instances: Sequence[Located]) -> list[PresentationContext]:
    """One context per SOP class to send, offering each stored syntax and the uncompressed ones."""
    syntaxes: dict[str, list[str]] = {}
    for located in instances:
        offered = syntaxes.setdefault(located.sop_class_uid, [])
        for ts in (located.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts and ts not in offered:
                offered.append(ts)
    return [build_context(sop, ts) for sop, ts in sorted(syntaxes.items()) if sop][:_MAX_CONTEXTS]


class QueryRetrieveListener:
    def __init__(self, settings: QrSettings, tls: TlsConfig | None, backends: Backends) -> None:
        self._settings = settings
        self._backends = backends
        self._server = DimseServer(settings.listener, tls, backends.audit)
        self._tls = self._server.tls  # the listener's own, for its C-MOVE and commitment associations
        self._gate = self._server.gate
        self._peers = settings.listener.peers
        self._commitment = CommitmentScp(
            self._gate, backends.index, self._tls, settings.listener.ae_title, settings.commitment_wait_s
        )

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    async def start(self) -> None:
        models = [SupportedContext(m) for m in (*_FIND_MODELS, *_GET_MODELS, *_MOVE_MODELS)]
        # C-GET sends on the requestor's own association, where it is the storage SCP.
        storage = [SupportedContext(uid, role=True) for uid in STORAGE_SOP_CLASSES]
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_N_ACTION, self._commitment.on_action),
            (evt.EVT_DIMSE_SENT, self._commitment.on_sent),
        ]
        commitment = SupportedContext(StorageCommitmentPushModel)
        await self._server.start([*models, *storage, commitment], handlers)

    async def stop(self) -> None:
        await self._server.stop()

    # -- C-FIND -----------------------------------------------------------------------------

    def _on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        peer = self._peer_for(event, "find")
        if peer is None:
            self._refused_audit(event, Action.AUDIT_ACTION_STUDY_QUERIED, "peer may not query", "dimse-find")
            DIMSE_REQUESTS.labels("find", "not_authorised").inc()
            yield status(NOT_AUTHORISED, "this peer may not query"), None
            return
        try:
            query = parse_query(event.identifier)
            answers = self._gate.wait(self._find(peer, query), self._settings.call_timeout_s)
        except QueryError as exc:
            DIMSE_REQUESTS.labels("find", "refused").inc()
            yield status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Refusal as exc:
            DIMSE_REQUESTS.labels("find", "refused").inc()
            yield status(exc.code, exc.comment), None
            return
        except Exception as exc:  # noqa: BLE001 - the type only: a decoder's message may quote values
            DIMSE_REQUESTS.labels("find", "retry_later").inc()
            log.warning("C-FIND not answered", extra={"calling_ae": peer.ae_title, "error": type(exc).__name__})
            yield status(OUT_OF_RESOURCES, "temporarily unavailable, ask again later"), None
            return
        DIMSE_REQUESTS.labels("find", "success").inc()
        for answer in answers:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, answer

    async def _find(self, peer: Peer, query: Query) -> list[Dataset]:
        details = {"route": "dimse-find", "level": query.level, "keys": ",".join(sorted(query.params))}
        # The gate proves the peer may query at all; each study is then decided on its own.
        gate = await self._check(peer, QUERY_ACTION, resource("study"))
        if not gate.allow and gate.reason_code == "unauthenticated":
            await self._audit(Action.AUDIT_ACTION_STUDY_QUERIED, Outcome.AUDIT_OUTCOME_DENIED, gate, details=details)
            raise Refusal(NOT_AUTHORISED, "not authorised")
        index_level: Level = LEVELS.get(query.level, "study")
        hits = await self._search(index_level, query.params)
        verdicts = await self._decide(peer, QUERY_ACTION, {h.study_uid: h for h in hits})
        visible = [h for h in hits if verdicts[h.study_uid].releases_identified]
        ae = self._settings.listener.ae_title
        if query.level == "PATIENT":
            answers = [_answer(query, attrs, ae) for attrs in _patients(visible)]
        else:
            answers = [_answer(query, h.attrs, ae) for h in visible]
        await self._audit(
            Action.AUDIT_ACTION_STUDY_QUERIED,
            Outcome.AUDIT_OUTCOME_SUCCESS,
            gate,
            details={
                **details,
                "results": str(len(answers)),
                "withheld": str(len(hits) - len(visible)),
                "studies": ",".join(sorted({h.study_uid for h in visible}))[:4000],
            },
        )
        return answers

    async def _search(self, level: Level, params: dict[str, str]) -> list[Found]:
        """Every match, page by page; more than max_matches refuses the query (A700)."""
        limit = self._settings.max_matches
        hits: list[Found] = []
        while True:
            page = await self._backends.index.search(level, params, offset=len(hits), limit=_PAGE)
            hits += page
            if len(hits) > limit:
                raise Refusal(OUT_OF_RESOURCES, f"more than {limit} matches: narrow the query")
            if len(page) < _PAGE:
                return hits

    # -- C-GET and C-MOVE -------------------------------------------------------------------

    def _on_get(self, event: Event) -> Iterator[int | tuple[int | Dataset, Dataset | str | None]]:
        peer = self._peer_for(event, "get")
        if peer is None:
            self._refused_audit(event, Action.AUDIT_ACTION_INSTANCE_RETRIEVED, "peer may not retrieve", "dimse-get")
            DIMSE_REQUESTS.labels("get", "not_authorised").inc()
            # One pretended sub-operation, so the refusal's own status reaches the peer.
            yield 1
            yield status(NOT_AUTHORISED, "this peer may not retrieve"), None
            return
        try:
            release = self._gate.wait(self._release_for(peer, event.identifier, "dimse-get"), self._call_s)
        except Exception as exc:  # noqa: BLE001
            yield 1
            yield self._retrieve_failure("get", peer, exc), None
            return
        yield len(release.instances)
        yield from self._send(event, peer, release, "get", "dimse-get")

    def _on_move(
        self, event: Event
    ) -> Iterator[tuple[str | None, int | None, dict[str, Any]] | int | tuple[int | Dataset, Dataset | str | None]]:
        destination_title = str(event.move_destination or "").strip()
        peer = self._peer_for(event, "move")
        destination = self._peers.move_destination(peer, destination_title) if peer is not None else None
        if peer is None or destination is None or destination.store_scp is None:
            reason = "peer may not move" if peer is None else "not a move destination of this peer"
            self._refused_audit(event, Action.AUDIT_ACTION_INSTANCE_RETRIEVED, reason, "dimse-move")
            DIMSE_REQUESTS.labels("move", "not_authorised").inc()
            yield None, None, {}  # A801: move destination unknown
            return
        route = f"dimse-move:{destination.name}"
        failure: Dataset | None = None
        release = Release((), {})
        try:
            release = self._gate.wait(self._release_for(peer, event.identifier, route), self._call_s)
        except Exception as exc:  # noqa: BLE001
            failure = self._retrieve_failure("move", peer, exc)
        host, port = destination.store_scp
        # Without instances pynetdicom opens no association; with a failure it does, to answer it.
        contexts = _storage_contexts(release.instances) or [build_context(STORAGE_SOP_CLASSES[0])]
        yield host, port, {"tls_args": (client_context(self._tls, destination), host), "contexts": contexts}
        if failure is not None:
            yield 1
            yield failure, None
            return
        yield len(release.instances)
        yield from self._send(event, peer, release, "move", route)

    @property
    def _call_s(self) -> float:
        return self._settings.call_timeout_s

    def _retrieve_failure(self, service: str, peer: Peer, exc: BaseException) -> Dataset:
        if isinstance(exc, QueryError):
            DIMSE_REQUESTS.labels(service, "refused").inc()
            return status(IDENTIFIER_MISMATCH, str(exc))
        if isinstance(exc, Refusal):
            DIMSE_REQUESTS.labels(service, "refused").inc()
            return status(exc.code, exc.comment)
        DIMSE_REQUESTS.labels(service, "retry_later").inc()
        log.warning("retrieve not answered", extra={"calling_ae": peer.ae_title, "error": type(exc).__name__})
        return status(OUT_OF_RESOURCES, "temporarily unavailable, ask again later")

    def _send(
        self, event: Event, peer: Peer, release: Release, service: str, route: str
    ) -> Iterator[tuple[int, Dataset | str | None]]:
        """Each instance opened, audited and handed to pynetdicom's C-STORE sub-operation; one
        that cannot be opened counts as a failed sub-operation (a non-data set to pynetdicom)."""
        for located in release.instances:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            verdict = release.verdicts[located.study_uid]
            try:
                ds = self._gate.wait(self._open(verdict, located, route), self._call_s)
            except Exception as exc:  # noqa: BLE001 - that sub-operation fails; the others go on
                log.warning("instance not sent", extra={"object_id": located.object_id, "error": type(exc).__name__})
                yield PENDING, "unreadable"
                continue
            yield PENDING, ds
        DIMSE_REQUESTS.labels(service, "success").inc()

    async def _release_for(self, peer: Peer, identifier: Dataset, route: str) -> Release:
        """The instances the identifier names that the peer may read, each study decided once."""
        located = await self._locate(identifier)
        by_study = {loc.study_uid: loc for loc in located}
        verdicts = await self._decide(peer, READ_ACTION, by_study)
        for study_uid, verdict in sorted(verdicts.items()):
            if not verdict.releases_identified:
                loc = by_study[study_uid]
                reason = "deidentified release only" if verdict.allow else verdict.reason_code or "denied"
                details = {"route": route, "instances": str(sum(1 for x in located if x.study_uid == study_uid))}
                await self._audit(
                    Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
                    Outcome.AUDIT_OUTCOME_DENIED,
                    verdict,
                    study_uid=study_uid,
                    patient_ref=loc.patient_ref,
                    reason=reason,
                    details=details,
                )
        allowed = tuple(loc for loc in located if verdicts[loc.study_uid].releases_identified)
        return Release(allowed, verdicts)

    async def _locate(self, identifier: Dataset) -> list[Located]:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        index = self._backends.index

        def uids(keyword: str) -> list[str]:
            values = [u.strip() for u in _text(identifier[keyword]).split("\\")] if keyword in identifier else []
            return [u for u in values if u]

        studies, series, sops = uids("StudyInstanceUID"), uids("SeriesInstanceUID"), uids("SOPInstanceUID")
        located: list[Located] = []
        if level == "PATIENT":
            patients = uids("PatientID")
            if not patients:
                raise QueryError("a PATIENT level retrieve needs PatientID")
            for patient in patients:
                for hit in await self._search("study", {"PatientID": patient}):
                    located += await index.locate(hit.study_uid)
        elif level == "STUDY" and studies:
            for study in studies:
                located += await index.locate(study)
        elif level == "SERIES" and len(studies) == 1 and series:
            for one in series:
                located += await index.locate(studies[0], one)
        elif level == "IMAGE" and len(studies) == 1 and len(series) == 1 and sops:
            for sop in sops:
                located += await index.locate(studies[0], series[0], sop)
        else:
            raise QueryError("a retrieve names its UIDs down to its QueryRetrieveLevel, one parent each")
        if len(located) > self._settings.max_retrieve:
            raise Refusal(OUT_OF_RESOURCES, f"more than {self._settings.max_retrieve} instances: retrieve less")
        return located

    async def _open(self, verdict: Verdict, located: Located, route: str) -> Dataset:
        """The whole instance, authenticated by crypto, audited as released, as a data set."""
        pieces: list[bytes] = []
        try:
            stream = self._backends.crypto.Open(
                crypto_pb2.OpenRequest(object_id=located.object_id, on_behalf_of=verdict.subject),
                timeout=self._backends.deadline_s,
            )
            async for piece in stream:
                pieces.append(piece.data)
        except grpc.aio.AioRpcError as exc:
            outcome = Outcome.AUDIT_OUTCOME_FAILURE
            reason = "stored object failed its integrity check" if exc.code() == grpc.StatusCode.DATA_LOSS else ""
            await self._audit(
                Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
                outcome,
                verdict,
                located=located,
                reason=reason or f"open failed ({exc.code().name})",
                details={"route": route},
            )
            raise
        await self._audit(
            Action.AUDIT_ACTION_INSTANCE_RETRIEVED,
            Outcome.AUDIT_OUTCOME_SUCCESS,
            verdict,
            located=located,
            details={"route": route, "deidentified": "false"},
        )
        self._backends.index.note_access(located.study_uid)
        return dcmread(io.BytesIO(b"".join(pieces)))

    # -- authz and audit --------------------------------------------------------------------

    def _peer_for(self, event: Event, service: str) -> Peer | None:
        admitted = self._gate.admitted(event.assoc)
        if admitted is None or service not in admitted.peer.services:
            return None
        return admitted.peer

    async def _check(self, peer: Peer, action: str, target: Any) -> Verdict:
        try:
            return await self._backends.access.check(action, target, dimse_peer=peer.name)
        except AuthzUnavailable:
            raise TransientError("authorisation unavailable") from None

    async def _decide(self, peer: Peer, action: str, studies: Mapping[str, Found | Located]) -> dict[str, Verdict]:
        """Each study decided on its own, all in as few authz calls as it takes (as QIDO-RS)."""
        targets = [
            resource("study", hit.study_uid, labels=hit.labels, where=Where(hit.site, hit.department, hit.patient_ref))
            for hit in studies.values()
        ]
        if not targets:
            return {}
        try:
            decided = await self._backends.access.check_many(action, targets, dimse_peer=peer.name)
        except AuthzUnavailable:
            raise TransientError("authorisation unavailable") from None
        return dict(zip(studies, decided, strict=True))

    def _refused_audit(self, event: Event, action: audit_pb2.AuditAction.ValueType, reason: str, route: str) -> None:
        admitted = self._gate.admitted(event.assoc)
        actor = admitted.peer.principal if admitted is not None else "unknown-peer"
        try:
            self._gate.wait(
                self._backends.audit.emit(
                    action, Outcome.AUDIT_OUTCOME_DENIED, actor, reason=reason, details={"route": route}
                ),
                self._call_s,
            )
        except Exception:  # noqa: BLE001 - refused either way; the log has it
            log.error("audit event of a refused DIMSE request not delivered", extra={"route": route})

    async def _audit(
        self,
        action: audit_pb2.AuditAction.ValueType,
        outcome: audit_pb2.AuditOutcome.ValueType,
        verdict: Verdict,
        *,
        located: Located | None = None,
        study_uid: str = "",
        patient_ref: str = "",
        reason: str = "",
        details: Mapping[str, str] | None = None,
    ) -> None:
        """No record, no answer: an audit failure fails the request (the peer retries)."""
        await self._backends.audit.emit(
            action,
            outcome,
            verdict.subject,
            actor_roles=list(verdict.roles),
            study_instance_uid=located.study_uid if located else study_uid,
            sop_instance_uid=located.sop_uid if located else "",
            object_id=located.object_id if located else "",
            patient_ref=located.patient_ref if located else patient_ref,
            reason=reason,
            details={**verdict.audit_details(), **(details or {})},
        )


def _patients(hits: Sequence[Found]) -> list[dict[str, Any]]:
    """Patient level: one answer per Patient ID, with the number of its visible studies."""
    by_patient: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for hit in hits:
        pid = str((hit.attrs.get(_PATIENT_ID, {}).get("Value") or [""])[0])
        counts[pid] = counts.get(pid, 0) + 1
        by_patient.setdefault(pid, {tag: hit.attrs[tag] for tag in _PATIENT_TAGS if tag in hit.attrs})
    return [
        {**attrs, _PATIENT_STUDIES: {"vr": "IS", "Value": [counts[pid]]}} for pid, attrs in sorted(by_patient.items())
    ]
