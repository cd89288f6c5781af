"""Orthanc (Debian package) as a remote PACS over DICOM TLS, both ways: it C-STOREs studies to
ingest, C-FINDs them at the gateway's query/retrieve AE and has them C-MOVEd back to itself,
our association to it pinned to its certificate. Its own C-MOVE to an AE title it may not
move to is refused (A801) and audited."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.dimse_peer import audit_records, peer_tls
from tests.orthanc_peer import orthanc_or_skip, orthanc_post
from tools import dicom_samples
from tools.orthanc import RunningOrthanc
from tools.ports import free_port
from tools.stack import DIMSE_AE_TITLE, QR_AE_TITLE, Stack

pytestmark = pytest.mark.e2e

PACS = "pacs-orthanc"  # a dimse_workstation in deploy/policy/policy.toml
ORTHANC_DICOM_PORT = free_port()
DIMSE_PEERS = [
    {
        "name": PACS,
        "ae_title": "ORTHANC",
        "certificate": PACS,
        "addresses": ["127.0.0.1/32"],
        "services": ["echo", "store", "find", "move"],
        "store_scp": f"127.0.0.1:{ORTHANC_DICOM_PORT}",
        "move_destinations": [PACS],
    }
]
PATIENT_ID = "ORTHANC-PAT-1"


@pytest.fixture(scope="module")
def orthanc(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrthanc]:
    tls = peer_tls(stack, PACS)
    modality = {"Host": "127.0.0.1", "UseDicomTls": True}
    config: dict[str, Any] = {
        "DicomAet": "ORTHANC",
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(tls.cert_file),
        "DicomTlsPrivateKey": str(tls.key_file),
        "DicomTlsTrustedCertificates": str(tls.ca_file),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {
            "store": {**modality, "AET": DIMSE_AE_TITLE, "Port": stack.settings.dimse_port},
            "qr": {**modality, "AET": QR_AE_TITLE, "Port": stack.settings.qr_port},
        },
    }
    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc"), config, ORTHANC_DICOM_PORT) as running:
        yield running


def test_orthanc_stores_finds_and_moves_back_over_tls(stack: Stack, orthanc: RunningOrthanc, tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    sent = []
    for i in range(3):
        ds = dicom_samples.ct_image(study_uid=study_uid, seed=300 + i, rows=64, columns=64)
        ds.PatientID = PATIENT_ID
        sent.append(ds)
    ids = [
        requests.post(f"{orthanc.http}/instances", data=dicom_samples.to_bytes(ds), timeout=60).json()["ID"]
        for ds in sent
    ]
    assert orthanc_post(orthanc, "/modalities/store/echo", {}) == {}
    orthanc_post(orthanc, "/modalities/store/store", {"Resources": ids, "Synchronous": True})
    asyncio.run(stack.wait_indexed({study_uid}))

    # Orthanc forgets the study, asks us where it is and has it moved back to itself.
    orthanc_study = requests.get(f"{orthanc.http}/instances/{ids[0]}/study", timeout=30).json()["ID"]
    requests.delete(f"{orthanc.http}/studies/{orthanc_study}", timeout=30).raise_for_status()
    query = orthanc_post(orthanc, "/modalities/qr/query", {"Level": "Study", "Query": {"PatientID": PATIENT_ID}})
    answers = requests.get(f"{orthanc.http}/queries/{query['ID']}/answers?expand&simplify", timeout=30).json()
    assert [a["StudyInstanceUID"] for a in answers] == [study_uid]
    orthanc_post(orthanc, f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    back = requests.get(f"{orthanc.http}/studies/{orthanc_study}/instances", timeout=30).json()
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in back} == {str(ds.SOPInstanceUID) for ds in sent}
    for instance in back:
        data = requests.get(f"{orthanc.http}/instances/{instance['ID']}/file", timeout=30).content
        got = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        assert got.PixelData == next(ds.PixelData for ds in sent if ds.SOPInstanceUID == got.SOPInstanceUID)

    moved = asyncio.run(
        audit_records(
            stack,
            {
                "event.action": "AUDIT_ACTION_INSTANCE_RETRIEVED",
                "event.study_instance_uid": study_uid,
                "event.details.route": f"dimse-move:{PACS}",
            },
            3,
        )
    )
    assert {r["event"]["actor"] for r in moved} == {f"dimse:{PACS}"}
    stored = asyncio.run(
        audit_records(stack, {"event.action": "AUDIT_ACTION_INSTANCE_STORED", "event.study_instance_uid": study_uid}, 3)
    )
    assert {r["event"]["actor"] for r in stored} == {f"dimse:{PACS}"}
    associations = asyncio.run(
        audit_records(stack, {"event.action": "AUDIT_ACTION_PEER_ASSOCIATION", "event.actor": f"dimse:{PACS}"}, 3)
    )
    # Orthanc's associations to both AEs (echo, store, find, move), each on TLS 1.3.
    assert {r["event"]["details"]["called_ae"] for r in associations} == {DIMSE_AE_TITLE, QR_AE_TITLE}
    assert {r["event"]["details"]["tls_version"] for r in associations} == {"TLSv1.3"}


def test_orthanc_move_to_an_unlisted_destination_is_refused(stack: Stack, orthanc: RunningOrthanc) -> None:
    reply = requests.post(
        f"{orthanc.http}/modalities/qr/move",
        json={"Level": "Study", "Resources": [{"StudyInstanceUID": "1.2.3.4"}], "TargetAet": "ELSEWHERE"},
        timeout=120,
    )
    assert not reply.ok  # Orthanc reports the A801 failure of its C-MOVE
    refused = asyncio.run(
        audit_records(
            stack,
            {
                "event.action": "AUDIT_ACTION_INSTANCE_RETRIEVED",
                "event.actor": f"dimse:{PACS}",
                "event.outcome": "AUDIT_OUTCOME_DENIED",
                "event.details.route": "dimse-move",
            },
            1,
        )
    )
    assert refused and refused[0]["event"]["reason"] == "not a move destination of this peer"
