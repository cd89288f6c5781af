"""The gateway's DIMSE query/retrieve listener against real peers: pynetdicom and DCMTK (findscu,
movescu) over mutual TLS 1.3, with the whole stack behind it.

DCMTK 3.6.7's getscu speaks no TLS, so C-GET is exercised with pynetdicom only.

Studies arrive as a modality sends them, by C-STORE to ingest; a reading workstation then
finds them (patient, study, series and image level), gets them on its own association and has
them moved to its storage SCP. Each answer comes from the index through authz, decided for the
workstation as a principal (``dimse:reading-ws1``, a policy role), and lands in the audit trail.

Refused: a peer without a role in the policy (finds and gets nothing, each decision audited
DENIED), a peer not granted the query service (0124), a C-MOVE to an AE title the requestor
may not move to (A801), a malformed identifier (A900).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.dimse_peer import associate, audit_records, peer_tls
from tools import dicom_samples
from tools.debian_packages import PackageMissing, ensure_binaries
from tools.ports import free_port as _free_port
from tools.stack import DIMSE_AE_TITLE, QR_AE_TITLE, Stack

pytestmark = pytest.mark.e2e


CT_PEER = "modality-ct1"
WORKSTATION = "reading-ws1"  # has the dimse_workstation role in deploy/policy/policy.toml
NO_ROLE = "reading-ws2"  # a configured peer that the policy gives nothing
ECHO_ONLY = "reading-ws3"
WS1_STORE_PORT = _free_port()
CT1_SCP_PORT = _free_port()
DIMSE_PEERS = [
    {
        "name": CT_PEER,
        "ae_title": "CT1",
        "certificate": CT_PEER,
        "addresses": ["127.0.0.1/32"],
        "services": ["store"],
        # Where a storage commitment report goes when the modality has closed its association.
        "store_scp": f"127.0.0.1:{CT1_SCP_PORT}",
    },
    {
        "name": WORKSTATION,
        "ae_title": "WS1",
        "certificate": WORKSTATION,
        "addresses": ["127.0.0.1/32"],
        "services": ["echo", "find", "get", "move"],
        "store_scp": f"127.0.0.1:{WS1_STORE_PORT}",
        "move_destinations": [WORKSTATION],
    },
    {
        "name": NO_ROLE,
        "ae_title": "WS2",
        "certificate": NO_ROLE,
        "addresses": ["127.0.0.1/32"],
        "services": ["find", "get"],
    },
    {
        "name": ECHO_ONLY,
        "ae_title": "WS3",
        "certificate": ECHO_ONLY,
        "addresses": ["127.0.0.1/32"],
        "services": ["echo"],
    },
]
PATIENT_ID = "QR-PAT-1"


@pytest.fixture(scope="module")
def study(stack: Stack) -> list[Dataset]:
    """Two series of one study, C-STOREd by the modality to ingest, then indexed."""
    study_uid = pydicom.uid.generate_uid()
    series = [pydicom.uid.generate_uid(), pydicom.uid.generate_uid()]
    sent: list[Dataset] = []
    for i in range(4):
        ds = dicom_samples.ct_image(study_uid=study_uid, seed=100 + i, rows=64, columns=64)
        ds.SeriesInstanceUID = series[i % 2]
        ds.PatientName = "QR^PATIENT"
        ds.PatientID = PATIENT_ID
        sent.append(ds)
    assoc = associate(stack, stack.settings.dimse_port, DIMSE_AE_TITLE, "CT1", CT_PEER, [build_context(CTImageStorage)])
    assert assoc.is_established
    try:
        for instance in sent:
            assert assoc.send_c_store(instance).Status == 0x0000
    finally:
        assoc.release()
    asyncio.run(stack.wait_indexed({study_uid}))
    return sent


def _qr(stack: Stack, calling: str, identity: str, *, handlers: list[Any] | None = None) -> Association:
    contexts = [
        build_context(Verification),
        build_context(PatientRootQueryRetrieveInformationModelFind),
        build_context(StudyRootQueryRetrieveInformationModelFind),
        build_context(StudyRootQueryRetrieveInformationModelGet),
        build_context(StudyRootQueryRetrieveInformationModelMove),
        build_context(CTImageStorage, ExplicitVRLittleEndian),
    ]
    return associate(
        stack,
        stack.settings.qr_port,
        QR_AE_TITLE,
        calling,
        identity,
        contexts,
        handlers=handlers or [],
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
    )


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(
    assoc: Association, identifier: Dataset, model: Any = StudyRootQueryRetrieveInformationModelFind
) -> tuple[list[Dataset], int]:
    matches: list[Dataset] = []
    final = -1
    for status, answer in assoc.send_c_find(identifier, model):
        if status.Status in (0xFF00, 0xFF01) and answer is not None:
            matches.append(answer)
        else:
            final = int(status.Status)
    return matches, final


def _get_study(assoc: Association, study_uid: str) -> list[tuple[Dataset, Dataset | None]]:
    """Every C-GET response for one study, the final one last."""
    return list(
        assoc.send_c_get(_identifier("STUDY", StudyInstanceUID=study_uid), StudyRootQueryRetrieveInformationModelGet)
    )


def _audit(stack: Stack, query: dict[str, Any], at_least: int) -> list[dict[str, Any]]:
    return asyncio.run(audit_records(stack, query, at_least))


def test_find_at_every_level(stack: Stack, study: list[Dataset]) -> None:
    study_uid = str(study[0].StudyInstanceUID)
    assoc = _qr(stack, "WS1", WORKSTATION)
    assert assoc.is_established
    try:
        found, final = _find(
            assoc,
            _identifier(
                "STUDY", PatientID=PATIENT_ID, StudyInstanceUID="", PatientName="", NumberOfStudyRelatedInstances=""
            ),
        )
        assert final == 0x0000
        assert [str(m.StudyInstanceUID) for m in found] == [study_uid]
        assert str(found[0].PatientName) == "QR^PATIENT"
        assert int(found[0].NumberOfStudyRelatedInstances) == 4
        assert found[0].RetrieveAETitle == QR_AE_TITLE

        series, final = _find(
            assoc, _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="")
        )
        assert final == 0x0000
        assert {str(s.SeriesInstanceUID) for s in series} == {str(ds.SeriesInstanceUID) for ds in study}

        one_series = str(study[0].SeriesInstanceUID)
        images, final = _find(
            assoc, _identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=one_series, SOPInstanceUID="")
        )
        assert final == 0x0000
        expected = {str(ds.SOPInstanceUID) for ds in study if ds.SeriesInstanceUID == one_series}
        assert {str(i.SOPInstanceUID) for i in images} == expected

        patients, final = _find(
            assoc,
            _identifier("PATIENT", PatientID=PATIENT_ID, PatientName="", NumberOfPatientRelatedStudies=""),
            PatientRootQueryRetrieveInformationModelFind,
        )
        assert final == 0x0000
        assert [(str(p.PatientID), int(p.NumberOfPatientRelatedStudies)) for p in patients] == [(PATIENT_ID, 1)]

        _, final = _find(assoc, _identifier("WARD", PatientID=PATIENT_ID))
        assert final == 0xA900
    finally:
        assoc.release()
    queried = _audit(stack, {"event.action": "AUDIT_ACTION_STUDY_QUERIED", "event.actor": f"dimse:{WORKSTATION}"}, 4)
    assert len(queried) >= 4
    assert {r["event"]["details"]["route"] for r in queried} == {"dimse-find"}
    assert all(r["event"]["outcome"] == "AUDIT_OUTCOME_SUCCESS" for r in queried)
    # The keys matched on are recorded, never their values (a Patient ID is PHI).
    assert all(PATIENT_ID not in str(r["event"]) for r in queried)


def test_get_sends_the_study_on_the_same_association(stack: Stack, study: list[Dataset]) -> None:
    received: list[Dataset] = []

    def on_store(event: Event) -> int:
        received.append(event.dataset)
        return 0x0000

    assoc = _qr(stack, "WS1", WORKSTATION, handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        responses = _get_study(assoc, str(study[0].StudyInstanceUID))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 4
    assert {str(ds.SOPInstanceUID): ds.PixelData for ds in received} == {
        str(ds.SOPInstanceUID): ds.PixelData for ds in study
    }
    sops = [str(ds.SOPInstanceUID) for ds in study]
    released = _audit(
        stack,
        {
            "event.action": "AUDIT_ACTION_INSTANCE_RETRIEVED",
            "event.sop_instance_uid": {"$in": sops},
            "event.details.route": "dimse-get",
        },
        4,
    )
    assert {r["event"]["actor"] for r in released} == {f"dimse:{WORKSTATION}"}
    assert {r["event"]["outcome"] for r in released} == {"AUDIT_OUTCOME_SUCCESS"}


class _StoreScp:
    """The workstation's own storage SCP over mutual TLS: where a C-MOVE to WS1 arrives."""

    def __init__(self, stack: Stack) -> None:
        tls = peer_tls(stack, WORKSTATION)
        ctx = tls.server_ssl_context(require_client_cert=True)
        self.received: list[Dataset] = []
        self.callers: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="WS1")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
        self._server: Any = ae.start_server(
            ("127.0.0.1", WS1_STORE_PORT), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
            self.callers.append(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def store_scp(stack: Stack) -> Iterator[_StoreScp]:
    scp = _StoreScp(stack)
    try:
        yield scp
    finally:
        scp.close()


def test_move_goes_to_the_configured_destination_only(stack: Stack, study: list[Dataset], store_scp: _StoreScp) -> None:
    identifier = _identifier(
        "SERIES", StudyInstanceUID=str(study[0].StudyInstanceUID), SeriesInstanceUID=str(study[1].SeriesInstanceUID)
    )
    assoc = _qr(stack, "WS1", WORKSTATION)
    assert assoc.is_established
    try:
        moved = list(assoc.send_c_move(identifier, "WS1", StudyRootQueryRetrieveInformationModelMove))
        elsewhere = list(assoc.send_c_move(identifier, "EXFIL", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert moved[-1][0].Status == 0x0000 and moved[-1][0].NumberOfCompletedSuboperations == 2
    expected = {
        str(ds.SOPInstanceUID): ds.PixelData for ds in study if ds.SeriesInstanceUID == study[1].SeriesInstanceUID
    }
    assert {str(ds.SOPInstanceUID): ds.PixelData for ds in store_scp.received} == expected
    assert set(store_scp.callers) == {QR_AE_TITLE}
    assert elsewhere[-1][0].Status == 0xA801
    refused = _audit(
        stack,
        {
            "event.action": "AUDIT_ACTION_INSTANCE_RETRIEVED",
            "event.outcome": "AUDIT_OUTCOME_DENIED",
            "event.details.route": "dimse-move",
        },
        1,
    )
    assert refused and refused[0]["event"]["reason"] == "not a move destination of this peer"


def test_peer_without_a_role_finds_and_gets_nothing(stack: Stack, study: list[Dataset]) -> None:
    assoc = _qr(stack, "WS2", NO_ROLE, handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    assert assoc.is_established
    try:
        found, final = _find(assoc, _identifier("STUDY", PatientID=PATIENT_ID, StudyInstanceUID=""))
        got = _get_study(assoc, str(study[0].StudyInstanceUID))
    finally:
        assoc.release()
    assert (found, final) == ([], 0x0000)
    assert got[-1][0].Status == 0x0000 and got[-1][0].NumberOfCompletedSuboperations == 0
    decisions = _audit(stack, {"event.action": "AUDIT_ACTION_ACCESS_DECISION", "event.actor": f"dimse:{NO_ROLE}"}, 2)
    assert decisions and {r["event"]["outcome"] for r in decisions} == {"AUDIT_OUTCOME_DENIED"}
    assert {r["event"]["details"]["authenticated"] for r in decisions} == {"dimse-certificate"}
    denied = _audit(
        stack,
        {
            "event.action": "AUDIT_ACTION_INSTANCE_RETRIEVED",
            "event.actor": f"dimse:{NO_ROLE}",
            "event.outcome": "AUDIT_OUTCOME_DENIED",
        },
        1,
    )
    assert denied and denied[0]["event"]["study_instance_uid"] == str(study[0].StudyInstanceUID)


def test_peer_not_granted_the_service_is_refused(stack: Stack) -> None:
    assoc = _qr(stack, "WS3", ECHO_ONLY)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        _, final = _find(assoc, _identifier("STUDY", PatientID=PATIENT_ID))
    finally:
        assoc.release()
    assert final == 0x0124


def test_storage_commitment_commits_only_what_is_stored(stack: Stack, study: list[Dataset]) -> None:
    """N-ACTION for two stored instances and one never sent: the N-EVENT-REPORT, on the same
    association, commits the two and fails the third (no such object instance)."""
    reports: list[tuple[int | None, Dataset]] = []
    arrived = threading.Event()

    def on_report(event: Event) -> int:
        reports.append((event.event_type, event.event_information))
        arrived.set()
        return 0x0000

    assoc = associate(
        stack,
        stack.settings.qr_port,
        QR_AE_TITLE,
        "CT1",
        CT_PEER,
        [build_context(StorageCommitmentPushModel)],
        handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    missing = pydicom.uid.generate_uid()
    request = Dataset()
    request.TransactionUID = pydicom.uid.generate_uid()
    request.ReferencedSOPSequence = []
    for sop_class, sop in [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in study[:2]] + [(CTImageStorage, missing)]:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
        request.ReferencedSOPSequence.append(item)
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assert status.Status == 0x0000
        assert arrived.wait(90), "no N-EVENT-REPORT"
    finally:
        assoc.release()
    event_type, info = reports[0]
    assert event_type == 2 and info.TransactionUID == request.TransactionUID
    assert {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence} == {
        str(ds.SOPInstanceUID) for ds in study[:2]
    }
    assert [(str(i.ReferencedSOPInstanceUID), i.FailureReason) for i in info.FailedSOPSequence] == [(missing, 0x0112)]


def test_storage_commitment_report_follows_on_a_new_association(stack: Stack, study: list[Dataset]) -> None:
    """The modality releases right after the N-ACTION response: the report comes on an
    association the gateway opens to the modality's configured address, over mutual TLS."""
    reports: list[tuple[int | None, Dataset, str]] = []
    arrived = threading.Event()

    def on_report(event: Event) -> int:
        reports.append((event.event_type, event.event_information, str(event.assoc.requestor.ae_title).strip()))
        arrived.set()
        return 0x0000

    tls = peer_tls(stack, CT_PEER)
    ctx = tls.server_ssl_context(require_client_cert=True)
    modality = AE(ae_title="CT1")
    modality.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server: Any = modality.start_server(
        ("127.0.0.1", CT1_SCP_PORT), block=False, ssl_context=ctx, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    try:
        assoc = associate(
            stack, stack.settings.qr_port, QR_AE_TITLE, "CT1", CT_PEER, [build_context(StorageCommitmentPushModel)]
        )
        assert assoc.is_established
        request = Dataset()
        request.TransactionUID = pydicom.uid.generate_uid()
        # One never sent: the report waits the commitment wait (10 s in tools.stack) for it, so
        # the modality has surely released by then.
        missing = pydicom.uid.generate_uid()
        request.ReferencedSOPSequence = []
        for sop_class, sop in [(study[0].SOPClassUID, study[0].SOPInstanceUID), (CTImageStorage, missing)]:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop
            request.ReferencedSOPSequence.append(item)
        try:
            status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        finally:
            assoc.release()
        assert status.Status == 0x0000
        assert arrived.wait(90), "no N-EVENT-REPORT"
    finally:
        server.shutdown()
    event_type, info, caller = reports[0]
    assert (event_type, caller) == (2, QR_AE_TITLE)
    assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [str(study[0].SOPInstanceUID)]
    assert [str(i.ReferencedSOPInstanceUID) for i in info.FailedSOPSequence] == [missing]


def test_dcmtk_findscu_and_storescp_as_move_destination(stack: Stack, study: list[Dataset], tmp_path: Path) -> None:
    """DCMTK 3.6.7's findscu queries over TLS; its storescp, with the workstation's certificate,
    takes the C-MOVE (its movescu and getscu have no TLS support)."""
    try:
        findscu, storescp = ensure_binaries("dcmtk", "findscu", "storescp")
    except PackageMissing as exc:
        pytest.skip(f"DCMTK: {exc}")
    tls = peer_tls(stack, WORKSTATION)
    tls_args = ["+tls", str(tls.key_file), str(tls.cert_file), "-pw", "+cf", str(tls.ca_file)]
    study_uid = str(study[0].StudyInstanceUID)

    found = tmp_path / "find"
    found.mkdir()
    done = subprocess.run(
        [
            findscu,
            *tls_args,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientID={PATIENT_ID}",
            "-k",
            "StudyInstanceUID",
            "-X",
            "-od",
            str(found),
            *["-aet", "WS1", "-aec", QR_AE_TITLE, "127.0.0.1", str(stack.settings.qr_port)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert [str(pydicom.dcmread(p).StudyInstanceUID) for p in sorted(found.iterdir())] == [study_uid]

    moved = tmp_path / "moved"
    moved.mkdir()
    scp = subprocess.Popen(
        [storescp, *tls_args, "-rc", "-aet", "WS1", "-od", str(moved), str(WS1_STORE_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(1.0)  # storescp has bound its port
        assoc = _qr(stack, "WS1", WORKSTATION)
        assert assoc.is_established
        try:
            identifier = _identifier("STUDY", StudyInstanceUID=study_uid)
            responses = list(assoc.send_c_move(identifier, "WS1", StudyRootQueryRetrieveInformationModelMove))
        finally:
            assoc.release()
    finally:
        scp.terminate()
        output = scp.communicate(timeout=30)[0]
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 4, output[-3000:]
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in moved.iterdir()} == {str(ds.SOPInstanceUID) for ds in study}
