"""DICOMweb conformance against two independent clients: the reference Python client
(dicomweb-client) on every route the gateway offers, and Orthanc's DICOMweb client (Debian's
orthanc-dicomweb plugin, configured with ``DicomWeb.Servers``) pushing studies to the gateway
with STOW-RS and pulling them back with QIDO-RS and WADO-RS, over TLS 1.3 with a bearer token.
Every byte is compared with what was sent, and every call is looked for on the audit trail."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless, generate_uid

from dicomsafe.common.kafka import Topics
from dicomsafe.v1 import audit_pb2
from tests.dicomweb_session import gateway_client
from tests.orthanc_peer import orthanc_or_skip, orthanc_post
from tests.topic_reader import read_to_end
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.orthanc import RunningOrthanc
from tools.stack import Stack

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Study:
    uid: str
    ct: FileDataset  # a slice with an overlay and an icon image
    rle: FileDataset  # a multi-frame, RLE Lossless
    us: FileDataset  # an ultrasound cine, native RGB
    originals: dict[str, bytes]  # SOP Instance UID → its Part 10 bytes

    def path(self, ds: FileDataset) -> tuple[str, str, str]:
        return self.uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _study(label: str, seed: int) -> Study:
    """A CT slice with an overlay and an icon image, an RLE multi-frame and an ultrasound cine."""
    patient = dicom_samples.synthetic_patient(label)
    uid = generate_uid()
    ct = dicom_samples.ct_with_overlay_and_icon(study_uid=uid, seed=seed, patient=patient)
    rle = dicom_samples.compress_lossless(
        dicom_samples.grayscale_multiframe(
            study_uid=uid, seed=seed + 1, patient=patient, frames=3, rows=32, columns=32
        ),
        RLELossless,
    )
    us = dicom_samples.us_multiframe(study_uid=uid, seed=seed + 2, patient=patient, frames=4, rows=48, columns=64)
    return Study(uid, ct, rle, us, {str(ds.SOPInstanceUID): dicom_samples.to_bytes(ds) for ds in (ct, rle, us)})


def _parsed(study: Study) -> list[pydicom.Dataset]:
    # Re-read from bytes so what a client sends is exactly the Part 10 file kept for comparison.
    return [pydicom.dcmread(io.BytesIO(data)) for data in study.originals.values()]


def _audit(stack: Stack) -> list[audit_pb2.AuditEvent]:
    topic = Topics(stack.settings.topic_prefix).audit
    return [audit_pb2.AuditEvent.FromString(v) for v in asyncio.run(read_to_end(stack.settings.kafka_bootstrap, topic))]


def _released_parts(events: list[audit_pb2.AuditEvent], actor: str, study: str) -> set[str]:
    ok = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
    return {
        e.details["part"]
        for e in events
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
        and (e.actor, e.study_instance_uid, e.outcome) == (actor, study, ok)
    }


def test_dicomweb_client_on_every_route(stack: Stack, idp: LocalIssuer) -> None:
    study = _study("conformance-client", seed=11)
    ct, rle, us = study.ct, study.rle, study.us
    tech = gateway_client(stack, idp.token("tech.jane"))
    # STOW-RS to the study's own URL (POST /studies/{study}).
    stored = tech.store_instances(_parsed(study), study_instance_uid=study.uid)
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in stored.ReferencedSOPSequence) == sorted(study.originals)
    assert "FailedSOPSequence" not in stored

    house = gateway_client(stack, idp.token("dr.house"))
    # QIDO-RS at each level, under the study and across studies.
    patient_id = str(ct.PatientID)
    found = house.search_for_studies(search_filters={"PatientID": patient_id}, fields=["all"])
    assert [s["0020000D"]["Value"][0] for s in found] == [study.uid]
    assert found[0]["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    series_uids = {str(ds.SeriesInstanceUID) for ds in (ct, rle, us)}
    assert {s["0020000E"]["Value"][0] for s in house.search_for_series(study.uid)} == series_uids
    across = house.search_for_series(search_filters={"PatientID": patient_id, "Modality": "US"})
    assert [s["0020000E"]["Value"][0] for s in across] == [str(us.SeriesInstanceUID)]
    assert {i["00080018"]["Value"][0] for i in house.search_for_instances(study.uid)} == set(study.originals)
    in_series = house.search_for_instances(study.uid, str(rle.SeriesInstanceUID))
    assert [i["00080018"]["Value"][0] for i in in_series] == [str(rle.SOPInstanceUID)]
    anywhere = house.search_for_instances(search_filters={"SOPInstanceUID": str(ct.SOPInstanceUID)})
    assert [i["0020000D"]["Value"][0] for i in anywhere] == [study.uid]

    # WADO-RS instances at study, series and instance level: the stored bytes, as sent.
    for got in house.retrieve_study(study.uid):
        assert dicom_samples.to_bytes(got) == study.originals[str(got.SOPInstanceUID)]
    (series_got,) = house.retrieve_series(study.uid, str(us.SeriesInstanceUID))
    assert series_got.PixelData == us.PixelData
    assert house.retrieve_instance(*study.path(rle)).PixelData == rle.PixelData

    # Metadata, and every BulkDataURI it names resolving to the value it stands for.
    assert len(house.retrieve_study_metadata(study.uid)) == 3
    assert len(house.retrieve_series_metadata(study.uid, str(ct.SeriesInstanceUID))) == 1
    meta = house.retrieve_instance_metadata(*study.path(ct))
    assert meta["00100020"]["Value"] == [patient_id]
    overlay = meta["60003000"]["BulkDataURI"]
    icon = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert house.retrieve_bulkdata(overlay) == [ct[0x60003000].value]
    assert house.retrieve_bulkdata(icon) == [ct.IconImageSequence[0].PixelData]
    assert house.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"]) == [ct.PixelData]

    # Frames as stored (RLE), decoded to native on request, and native frames of the cine.
    stored_frames = list(generate_frames(rle.PixelData, number_of_frames=3))
    assert house.retrieve_instance_frames(*study.path(rle), frame_numbers=[3, 1]) == [
        stored_frames[2],
        stored_frames[0],
    ]
    decoded = house.retrieve_instance_frames(
        *study.path(rle), frame_numbers=[2], media_types=(("application/octet-stream", EXPLICIT_LE),)
    )
    assert decoded == [np.ascontiguousarray(rle.pixel_array[1], dtype="<u2").tobytes()]
    frame_bytes = 48 * 64 * 3
    assert house.retrieve_instance_frames(*study.path(us), frame_numbers=[4]) == [
        us.PixelData[3 * frame_bytes : 4 * frame_bytes]
    ]

    # Rendered images of an instance and of one frame.
    png = Image.open(io.BytesIO(house.retrieve_instance_rendered(*study.path(ct), media_types=("image/png",))))
    assert (png.format, png.size) == ("PNG", (128, 128))
    jpeg = house.retrieve_instance_frames_rendered(*study.path(us), frame_numbers=[2], media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpeg)).size == (64, 48)

    # Deletion is not a DICOMweb operation here (erasure is the audited operator command).
    with pytest.raises(requests.HTTPError) as refused:
        house.delete_study(study.uid)
    assert refused.value.response is not None and refused.value.response.status_code == 405
    assert [s["0020000D"]["Value"][0] for s in house.search_for_studies(search_filters={"PatientID": patient_id})] == [
        study.uid
    ]

    events = _audit(stack)
    assert _released_parts(events, "dr.house", study.uid) == {
        "instance",
        "metadata",
        "bulkdata:60003000",
        "bulkdata:00880200/0/7FE00010",
        "bulkdata",
        "frames:3,1",
        "frames:2",
        "frames:4",
        "rendered:1",
        "rendered:2",
    }
    queried = [
        e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_STUDY_QUERIED and e.actor == "dr.house"
    ]
    assert len(queried) >= 6
    stored_events = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_STORED]
    assert {e.sop_instance_uid for e in stored_events if e.actor == "tech.jane"} >= set(study.originals)


def test_bulk_data_is_refused_to_a_researcher(stack: Stack, idp: LocalIssuer) -> None:
    """De-identified metadata names no BulkDataURI, and asking for one under the pseudonymous
    UIDs a researcher holds is refused (403)."""
    study = _study("conformance-research", seed=21)
    gateway_client(stack, idp.token("tech.jane")).store_instances(_parsed(study))
    research = gateway_client(stack, idp.token("res.rao"))
    ct_instances = [
        (st["0020000D"]["Value"][0], i["0020000E"]["Value"][0], i["00080018"]["Value"][0])
        for st in research.search_for_studies()
        for i in research.search_for_instances(st["0020000D"]["Value"][0], fields=["00080016"])
        if i["00080016"]["Value"] == [CT_IMAGE_STORAGE]
    ]
    assert ct_instances and not {sop for _, _, sop in ct_instances} & set(study.originals)
    for path in ct_instances:
        assert "BulkDataURI" not in json.dumps(research.retrieve_instance_metadata(*path))
        base = f"{stack.settings.dicomweb_url}/studies/{path[0]}/series/{path[1]}/instances/{path[2]}/bulkdata"
        for value in ("60003000", "00880200/0/7FE00010"):
            with pytest.raises(requests.HTTPError) as refused:
                research.retrieve_bulkdata(f"{base}/{value}")
            assert refused.value.response is not None and refused.value.response.status_code == 403


@pytest.fixture(scope="module")
def orthanc(stack: Stack, idp: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrthanc]:
    """Orthanc with the gateway as two DICOMweb servers: one it stores to as a technologist's
    modality-side system would, one it reads from as a radiologist's workstation would."""
    root = stack.settings.dicomweb_url + "/"
    # Long enough for the module; Orthanc's configuration holds static headers.
    lifetime = 1800
    config = {
        "HttpsCACertificates": str(stack.settings.ca_file),
        "HttpsVerifyPeers": True,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {
                "dicomsafe-store": {
                    "Url": root,
                    "HttpHeaders": {"Authorization": f"Bearer {idp.token('tech.jane', lifetime_s=lifetime)}"},
                },
                "dicomsafe-read": {
                    "Url": root,
                    "HttpHeaders": {"Authorization": f"Bearer {idp.token('dr.house', lifetime_s=lifetime)}"},
                },
            },
        },
    }
    with orthanc_or_skip(tmp_path_factory.mktemp("orthanc-dicomweb"), config) as running:
        yield running


def _post(orthanc: RunningOrthanc, path: str, body: Any) -> Any:
    # A synchronous push or pull of a whole study: longer than Orthanc's other calls.
    return orthanc_post(orthanc, path, body, timeout_s=300)


def test_orthanc_pushes_a_study_to_the_gateway(stack: Stack, idp: LocalIssuer, orthanc: RunningOrthanc) -> None:
    study = _study("conformance-orthanc-push", seed=31)
    ids = [
        requests.post(f"{orthanc.http}/instances", data=data, timeout=60).json()["ID"]
        for data in study.originals.values()
    ]
    _post(orthanc, "/dicom-web/servers/dicomsafe-store/stow", {"Resources": ids})

    house = gateway_client(stack, idp.token("dr.house"))
    got = {str(ds.SOPInstanceUID): ds for ds in house.retrieve_study(study.uid)}
    assert set(got) == set(study.originals)
    for sop, ds in got.items():
        # Orthanc sends the file it stored, and the gateway keeps it byte for byte.
        assert dicom_samples.to_bytes(ds) == study.originals[sop]
    stored = [
        e
        for e in _audit(stack)
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_STORED and e.study_instance_uid == study.uid
    ]
    assert {(e.actor, e.sop_instance_uid) for e in stored} == {("tech.jane", sop) for sop in study.originals}


def test_orthanc_finds_and_pulls_a_study_from_the_gateway(
    stack: Stack, idp: LocalIssuer, orthanc: RunningOrthanc
) -> None:
    study = _study("conformance-orthanc-pull", seed=41)
    gateway_client(stack, idp.token("tech.jane")).store_instances(_parsed(study))
    patient_id = str(study.ct.PatientID)

    # QIDO-RS through Orthanc's client, as its Explorer's "DICOMweb" tab does.
    answers = _post(
        orthanc, "/dicom-web/servers/dicomsafe-read/qido", {"Uri": "/studies", "Arguments": {"PatientID": patient_id}}
    )
    # Orthanc answers in its own simplified JSON: one string per value.
    assert [a["0020000D"]["Value"] for a in answers] == [study.uid]
    assert answers[0]["00100020"]["Value"] == patient_id
    _post(orthanc, "/dicom-web/servers/dicomsafe-read/retrieve", {"Resources": [{"Study": study.uid}]})

    found = _post(orthanc, "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study.uid}})
    assert len(found) == len(study.originals)
    for orthanc_id in found:
        data = requests.get(f"{orthanc.http}/instances/{orthanc_id}/file", timeout=60).content
        sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        assert data == study.originals[sop]
    assert _released_parts(_audit(stack), "dr.house", study.uid) >= {"instance"}
