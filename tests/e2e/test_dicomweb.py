"""DICOMweb through the gateway, driven by a real DICOMweb client (dicomweb-client), over TLS 1.3.

A multi-study STOW-RS upload, QIDO-RS searches, WADO-RS instances, metadata and frames compared
byte for byte with the originals; refusals without a token, with an expired token or grant,
and without MFA on a sensitive study, each audited (on studies of their own, whatever ran before);
allowed requests that release nothing (404, 406, a researcher's frames) audited too; the
researcher's de-identified release; every call in the audit stream.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from aiokafka import AIOKafkaConsumer
from google.protobuf.timestamp_pb2 import Timestamp
from PIL import Image
from pydicom.dataset import FileDataset
from pydicom.encaps import generate_fragments
from pydicom.uid import generate_uid
from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics
from dicomsafe.storage import sealed_format as fmt
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc, authz_pb2, authz_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.dicomweb_session import gateway_client
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import VIEWER_ORIGIN, Stack

MFA = ("pwd", "otp")


@dataclass(frozen=True)
class Upload:
    ct_study: str
    us_study: str
    vip_study: str
    originals: dict[str, bytes]  # SOP Instance UID → Part 10 bytes
    datasets: dict[str, FileDataset]


def _status(exc_info: pytest.ExceptionInfo[requests.HTTPError]) -> int:
    response = exc_info.value.response
    assert response is not None
    return response.status_code


def _samples() -> tuple[Upload, list[FileDataset]]:
    patient = dicom_samples.synthetic_patient("dicomweb")
    ct_study, us_study, vip_study = generate_uid(), generate_uid(), generate_uid()
    ct = [dicom_samples.ct_image(study_uid=ct_study, seed=i, patient=patient, rows=64, columns=64) for i in range(2)]
    ct.append(dicom_samples.jpeg2000_lossless_ct(study_uid=ct_study, seed=7, patient=patient))
    us = dicom_samples.us_multiframe(study_uid=us_study, seed=3, patient=patient, frames=6, rows=48, columns=64)
    rle = dicom_samples.compress_lossless(
        dicom_samples.grayscale_multiframe(study_uid=us_study, seed=4, patient=patient, frames=3, rows=32, columns=32),
        pydicom.uid.RLELossless,
    )
    for cardiology in (us, rle):
        cardiology.InstitutionalDepartmentName = "cardiology"
    vip = dicom_samples.mr_image(study_uid=vip_study, seed=5, rows=64, columns=64)
    vip.ConfidentialityConstraintOnPatientDataDescription = "VIP - board member"
    datasets = [*ct, us, rle, vip]
    originals = {str(ds.SOPInstanceUID): dicom_samples.to_bytes(ds) for ds in datasets}
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    return Upload(ct_study, us_study, vip_study, originals, by_uid), datasets


@pytest.fixture(scope="module")
def upload(stack: Stack, idp: LocalIssuer) -> Iterator[Upload]:
    result, datasets = _samples()
    # Re-read from bytes so what the client sends is exactly the Part 10 file we keep.
    parsed = [pydicom.dcmread(io.BytesIO(result.originals[str(ds.SOPInstanceUID)])) for ds in datasets]
    # The VIP study needs MFA to store as much as to read.
    response = gateway_client(stack, idp.token("tech.jane", amr=MFA)).store_instances(parsed)
    stored = response.get("ReferencedSOPSequence", [])
    assert sorted(str(item.ReferencedSOPInstanceUID) for item in stored) == sorted(result.originals)
    assert "FailedSOPSequence" not in response
    yield result


def test_stow_reports_each_instance_and_refuses_bad_parts(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    # Storing the same instances again is idempotent and still reported as stored.
    again = pydicom.dcmread(io.BytesIO(upload.originals[next(iter(upload.originals))]))
    assert len(gateway_client(stack, idp.token("tech.jane")).store_instances([again]).ReferencedSOPSequence) == 1

    # One good and one broken part: 202 with the broken one listed as failed, the good one stored.
    boundary = "b" + uuid.uuid4().hex
    good = dicom_samples.to_bytes(dicom_samples.ct_image(seed=11, rows=32, columns=32))
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + good
        + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + b"not a dicom file"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    reply = requests.post(
        f"{stack.settings.dicomweb_url}/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {idp.token('tech.jane')}",
            "Accept": "application/dicom+json",
        },
        verify=str(stack.settings.ca_file),
        timeout=60,
    )
    assert reply.status_code == 202
    answer = reply.json()
    assert len(answer["00081199"]["Value"]) == 1
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]

    # Without MFA the VIP instance is refused (0x0124 not authorised) and nothing else is affected.
    vip_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.vip_study)
    vip = pydicom.dcmread(io.BytesIO(upload.originals[vip_uid]))
    with pytest.raises(requests.HTTPError) as no_mfa:
        gateway_client(stack, idp.token("tech.jane")).store_instances([vip])
    assert _status(no_mfa) == 409
    assert no_mfa.value.response is not None
    assert no_mfa.value.response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]

    # A radiologist may read but not store; no token at all is 401; a wrong media type is 415.
    with pytest.raises(requests.HTTPError) as refused:
        gateway_client(stack, idp.token("dr.house")).store_instances([again])
    assert _status(refused) == 409
    with pytest.raises(requests.HTTPError) as anonymous:
        gateway_client(stack, None).store_instances([again])
    assert _status(anonymous) == 401
    wrong = requests.post(
        f"{stack.settings.dicomweb_url}/studies",
        data=b"{}",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {idp.token('tech.jane')}"},
        verify=str(stack.settings.ca_file),
        timeout=30,
    )
    assert wrong.status_code == 415


def _stow_raw(stack: Stack, token: str, parts: list[bytes]) -> requests.Response:
    boundary = "b" + uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return requests.post(
        f"{stack.settings.dicomweb_url}/studies",
        data=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {token}",
            "Accept": "application/dicom+json",
        },
        verify=str(stack.settings.ca_file),
        timeout=60,
    )


def test_stow_with_a_chunked_body_split_anywhere(stack: Stack, idp: LocalIssuer) -> None:
    """dicomweb-client and browsers send STOW-RS bodies chunked (no Content-Length): chunks of an
    odd size cut boundaries, part headers and instances at every possible place."""
    study = generate_uid()
    sent = [dicom_samples.to_bytes(ds) for ds in dicom_samples.ct_series(study_uid=study, slices=3, size=64)]
    sent.append(dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=study, seed=8, frames=4, rows=64)))
    boundary = "c" + uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in sent)
    body += f"--{boundary}--\r\n".encode()

    def chunks(size: int = 7919) -> Iterator[bytes]:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    reply = requests.post(
        f"{stack.settings.dicomweb_url}/studies/{study}",
        data=chunks(),  # a generator: requests sends Transfer-Encoding: chunked
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {idp.token('tech.jane')}",
            "Accept": "application/dicom+json",
        },
        verify=str(stack.settings.ca_file),
        timeout=120,
    )
    assert reply.request.headers.get("Transfer-Encoding") == "chunked"
    assert reply.status_code == 200, reply.text
    stored = reply.json()["00081199"]["Value"]
    assert len(stored) == len(sent)
    asyncio.run(stack.wait_indexed({study}))
    house = gateway_client(stack, idp.token("dr.house"))
    originals = {str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID): p for p in sent}
    for ds in house.retrieve_study(study):
        assert ds.PixelData == pydicom.dcmread(io.BytesIO(originals[str(ds.SOPInstanceUID)])).PixelData


def test_real_world_files_are_stored_as_sent_with_their_warnings(stack: Stack, idp: LocalIssuer) -> None:
    """RT Dose and RT Plan whose file meta names another SOP Instance UID, a 4:2:2 YBR image, and a
    CT whose file meta names another SOP Class: all stored and retrievable byte for byte by their
    dataset's UIDs; the SOP Class one reported to the sender (PS3.18 warning B007, HTTP 202)."""
    files = [
        dicom_samples._bundled_path(n).read_bytes()
        for n in ("rtdose.dcm", "rtplan.dcm", "SC_ybr_full_422_uncompressed.dcm")
    ]
    ct = dicom_samples.ct_image(study_uid=generate_uid(), seed=31, rows=16, columns=16)
    raw = dicom_samples.to_bytes(ct)
    meta_end = raw.index(str(ct.SOPInstanceUID).encode())
    ct_class, mr_class = str(pydicom.uid.CTImageStorage).encode(), str(pydicom.uid.MRImageStorage).encode()
    files.append(raw[:meta_end].replace(ct_class, mr_class) + raw[meta_end:])
    reply = _stow_raw(stack, idp.token("tech.jane"), files)
    assert reply.status_code == 202, reply.text
    answer = reply.json()
    assert "00081198" not in answer
    items = {i["00081155"]["Value"][0]: i for i in answer["00081199"]["Value"]}
    datasets = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    assert set(items) == {str(ds.SOPInstanceUID) for ds in datasets}
    assert items[str(ct.SOPInstanceUID)]["00081196"]["Value"] == [0xB007]
    assert all("00081196" not in i for uid, i in items.items() if uid != str(ct.SOPInstanceUID))
    client = gateway_client(stack, idp.token("dr.house"))
    for data, ds in zip(files, datasets, strict=True):
        url = (
            f"{stack.settings.dicomweb_url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}"
            f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}&contentType=application/dicom"
        )
        got = client._session.get(url, timeout=30)
        assert got.status_code == 200 and got.content == data


def test_same_uid_with_other_content_is_refused_and_the_first_kept(stack: Stack, idp: LocalIssuer) -> None:
    """PS3.4 0111H to the sender; the first stored instance is what WADO keeps serving."""
    first = dicom_samples.ct_image(study_uid=generate_uid(), seed=41, rows=16, columns=16)
    data = dicom_samples.to_bytes(first)
    other = pydicom.dcmread(io.BytesIO(data))
    other.SeriesDescription = "re-sent with other content"
    token = idp.token("tech.jane")
    assert _stow_raw(stack, token, [data]).status_code == 200
    refused = _stow_raw(stack, token, [dicom_samples.to_bytes(other)])
    assert refused.status_code == 409, refused.text
    failed = refused.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0111]
    assert failed["00081155"]["Value"] == [str(first.SOPInstanceUID)]
    assert _stow_raw(stack, token, [data]).status_code == 200  # the same bytes again: idempotent
    got = gateway_client(stack, idp.token("dr.house")).retrieve_instance(*_path(first))
    assert got.SeriesDescription == first.SeriesDescription


def test_qido_matches_pages_and_hides_sensitive_studies(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    house = gateway_client(stack, idp.token("dr.house"))
    patient_id = str(upload.datasets[next(iter(upload.originals))].PatientID)
    studies = house.search_for_studies(search_filters={"PatientID": patient_id})
    found = {s["0020000D"]["Value"][0]: s for s in studies}
    assert set(found) == {upload.ct_study, upload.us_study}
    assert found[upload.ct_study]["00201208"]["Value"] == [3]
    us_modalities = sorted({str(d.Modality) for d in upload.datasets.values() if d.StudyInstanceUID == upload.us_study})
    assert found[upload.us_study]["00080061"]["Value"] == us_modalities

    assert [s["0020000D"]["Value"][0] for s in house.search_for_studies(search_filters={"ModalitiesInStudy": "US"})]
    page = house.search_for_studies(search_filters={"PatientID": patient_id}, limit=1, offset=1)
    assert len(page) == 1 and page[0]["0020000D"]["Value"][0] in found
    name = str(upload.datasets[next(iter(upload.originals))].PatientName)
    wildcard = house.search_for_studies(search_filters={"PatientName": name[:3].lower() + "*"})
    assert upload.ct_study in {s["0020000D"]["Value"][0] for s in wildcard}
    # fuzzymatching: a given name alone, in any case, finds the patient; without it, it does not.
    given = name.split("^")[1] if "^" in name else name
    fuzzy = house.search_for_studies(search_filters={"PatientName": given.lower()}, fuzzymatching=True)
    assert upload.ct_study in {s["0020000D"]["Value"][0] for s in fuzzy}
    if "^" in name:
        assert upload.ct_study not in {
            s["0020000D"]["Value"][0] for s in house.search_for_studies(search_filters={"PatientName": given.lower()})
        }

    series = house.search_for_series(upload.us_study)
    assert sorted({s["00080060"]["Value"][0] for s in series}) == us_modalities
    instances = house.search_for_instances(upload.ct_study)
    assert len(instances) == 3 and all("00081190" in i for i in instances)

    # The VIP study is withheld without MFA and listed with it.
    vip_filter = {"StudyInstanceUID": upload.vip_study}
    assert house.search_for_studies(search_filters=vip_filter) == []
    with_mfa = gateway_client(stack, idp.token("dr.house", amr=MFA)).search_for_studies(search_filters=vip_filter)
    assert [s["0020000D"]["Value"][0] for s in with_mfa] == [upload.vip_study]

    # A researcher may not match on a patient's identifiers: a 400 with a DICOM JSON error.
    for key, value in (("PatientID", patient_id), ("PatientName", name[:3] + "*"), ("StudyDate", "19000101-")):
        refused = requests.get(
            f"{stack.settings.dicomweb_url}/studies",
            params={key: value},
            headers={"Authorization": f"Bearer {idp.token('res.rao')}", "Accept": "application/dicom+json"},
            verify=str(stack.settings.ca_file),
            timeout=30,
        )
        assert refused.status_code == 400 and refused.headers["Content-Type"] == "application/dicom+json"
        assert refused.json()["00000902"]["Value"] == [f"{key} is not matchable in de-identified queries"]


def test_wado_returns_exact_instances_metadata_and_frames(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    client = gateway_client(stack, idp.token("dr.house"))
    for sop_uid, original in upload.originals.items():
        ds = upload.datasets[sop_uid]
        if str(ds.StudyInstanceUID) == upload.vip_study:
            continue
        retrieved = client.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uid)
        assert retrieved == pydicom.dcmread(io.BytesIO(original))
        assert retrieved.PixelData == pydicom.dcmread(io.BytesIO(original)).PixelData

    # Byte-exact at the HTTP level: the multipart part is the stored Part 10 file itself.
    ct_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.ct_study)
    ct = upload.datasets[ct_uid]
    response = requests.get(
        f"{stack.settings.dicomweb_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct_uid}",
        headers={
            "Accept": 'multipart/related; type="application/dicom"',
            "Authorization": f"Bearer {idp.token('dr.house')}",
        },
        verify=str(stack.settings.ca_file),
        timeout=30,
    )
    response.raise_for_status()
    # The client's own multipart decoder, on the raw parts before pydicom parses them.
    raw = list(client._decode_multipart_message(response, stream=False))
    assert raw == [upload.originals[ct_uid]]

    study = client.retrieve_study(upload.us_study)
    assert sorted(str(d.SOPInstanceUID) for d in study) == sorted(
        u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.us_study
    )

    metadata = client.retrieve_instance_metadata(str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), ct_uid)
    assert metadata["00100010"]["Value"][0]["Alphabetic"] == str(ct.PatientName)
    assert metadata["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7fe00010")
    # A technologist checks what was stored (instance.read_metadata) but does not view images.
    tech = gateway_client(stack, idp.token("tech.jane"))
    ct_path = (str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), ct_uid)
    assert tech.retrieve_instance_metadata(*ct_path)["00080018"]["Value"] == [ct_uid]
    with pytest.raises(requests.HTTPError) as refused:
        tech.retrieve_instance(*ct_path)
    assert refused.value.response.status_code == 403

    us = next(d for d in upload.datasets.values() if d.Modality == "US")
    frame_size = int(us.Rows) * int(us.Columns) * 3
    frames = client.retrieve_instance_frames(
        str(us.StudyInstanceUID), str(us.SeriesInstanceUID), str(us.SOPInstanceUID), [2, 5]
    )
    assert frames == [us.PixelData[frame_size : 2 * frame_size], us.PixelData[4 * frame_size : 5 * frame_size]]

    rle = next(d for d in upload.datasets.values() if str(d.file_meta.TransferSyntaxUID) == pydicom.uid.RLELossless)
    # The first item is the basic offset table; one fragment per frame follows.
    fragments = list(generate_fragments(rle.PixelData))[1:]
    rle_frames = client.retrieve_instance_frames(
        str(rle.StudyInstanceUID),
        str(rle.SeriesInstanceUID),
        str(rle.SOPInstanceUID),
        [3],
        media_types=(("image/dicom-rle", "1.2.840.10008.1.2.5"),),
    )
    assert rle_frames == [fragments[2]]
    # The same frame decoded to Explicit VR Little Endian for a client that cannot read RLE; and a
    # JPEG 2000 frame likewise: exactly the pixels that were encoded.
    native = (("application/octet-stream", "1.2.840.10008.1.2.1"),)
    rle_path = (str(rle.StudyInstanceUID), str(rle.SeriesInstanceUID), str(rle.SOPInstanceUID))
    decoded = client.retrieve_instance_frames(*rle_path, [3], media_types=native)
    assert decoded == [rle.pixel_array[2].astype("<i2").tobytes()]
    j2k = next(
        d for d in upload.datasets.values() if str(d.file_meta.TransferSyntaxUID) == pydicom.uid.JPEG2000Lossless
    )
    j2k_path = (str(j2k.StudyInstanceUID), str(j2k.SeriesInstanceUID), str(j2k.SOPInstanceUID))
    (j2k_frame,) = client.retrieve_instance_frames(*j2k_path, [1], media_types=native)
    assert j2k_frame == j2k.pixel_array.astype(j2k.pixel_array.dtype.newbyteorder("<")).tobytes()
    # A syntax neither stored nor decoded to: 406.
    with pytest.raises(requests.HTTPError) as other:
        client.retrieve_instance_frames(*rle_path, [3], media_types=(("image/jls", "1.2.840.10008.1.2.4.80"),))
    assert other.value.response.status_code == 406


def test_rendered_and_thumbnail_images(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    """Consumer images decoded from the stored pixels (PS3.18 rendered and thumbnail), audited."""
    root, ca = stack.settings.dicomweb_url, str(stack.settings.ca_file)

    def get(path: str, accept: str = "image/png", token: str | None = None, **query: str) -> requests.Response:
        bearer = token if token is not None else idp.token("dr.house")
        headers = {"Accept": accept, **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
        return requests.get(f"{root}{path}", params=query, headers=headers, verify=ca, timeout=60)

    us = next(d for d in upload.datasets.values() if d.Modality == "US" and int(d.get("NumberOfFrames", 1)) > 1)
    us_path = f"/studies/{us.StudyInstanceUID}/series/{us.SeriesInstanceUID}/instances/{us.SOPInstanceUID}"
    second = get(f"{us_path}/frames/2/rendered")
    assert second.status_code == 200 and second.headers["Content-Type"] == "image/png"
    assert (np.asarray(Image.open(io.BytesIO(second.content))) == us.pixel_array[1]).all()

    ct = next(d for d in upload.datasets.values() if str(d.StudyInstanceUID) == upload.ct_study)
    ct_path = f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    jpeg = get(f"{ct_path}/rendered", accept="image/jpeg", quality="80")
    assert jpeg.status_code == 200
    image = Image.open(io.BytesIO(jpeg.content))
    assert image.format == "JPEG" and image.size == (ct.Columns, ct.Rows)
    thumb = get(f"/studies/{upload.ct_study}/thumbnail", accept="*/*")
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 128

    assert get(f"{ct_path}/rendered", accept="application/dicom").status_code == 406
    assert get(f"{us_path}/frames/99/rendered").status_code == 404
    assert get(f"{ct_path}/rendered", token="").status_code == 401
    assert get(f"/studies/{upload.ct_study}/thumbnail", token=idp.token("mallory")).status_code == 403

    # The study's thumbnail is of one of its instances, whichever the gateway picked.
    ours = (us.SOPInstanceUID, ct.SOPInstanceUID)
    events = [
        e
        for e in asyncio.run(_gateway_events(stack))
        if e.sop_instance_uid in ours
        or (e.study_instance_uid == upload.ct_study and e.details.get("part") == "thumbnail")
    ]
    parts = {(e.actor, e.details.get("part"), e.outcome) for e in events}
    Out = audit_pb2.AuditOutcome
    assert ("dr.house", "rendered:2", Out.AUDIT_OUTCOME_SUCCESS) in parts
    assert ("dr.house", "rendered:1", Out.AUDIT_OUTCOME_SUCCESS) in parts
    assert ("dr.house", "thumbnail", Out.AUDIT_OUTCOME_SUCCESS) in parts
    assert ("dr.house", "rendered:99", Out.AUDIT_OUTCOME_FAILURE) in parts


def test_wado_refusals(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    ct_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.ct_study)
    ct = upload.datasets[ct_uid]
    path = (str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), ct_uid)

    with pytest.raises(requests.HTTPError) as anonymous:
        gateway_client(stack, None).retrieve_instance(*path)
    assert _status(anonymous) == 401
    with pytest.raises(requests.HTTPError) as expired:
        gateway_client(stack, idp.token("dr.house", lifetime_s=-120)).retrieve_instance(*path)
    assert _status(expired) == 401
    with pytest.raises(requests.HTTPError) as not_allowed:
        gateway_client(stack, idp.token("tech.jane")).retrieve_instance(*path)
    assert _status(not_allowed) == 403

    vip = next(d for d in upload.datasets.values() if str(d.StudyInstanceUID) == upload.vip_study)
    vip_path = (str(vip.StudyInstanceUID), str(vip.SeriesInstanceUID), str(vip.SOPInstanceUID))
    with pytest.raises(requests.HTTPError) as no_mfa:
        gateway_client(stack, idp.token("dr.house")).retrieve_instance(*vip_path)
    assert _status(no_mfa) == 401
    assert "insufficient_user_authentication" in no_mfa.value.response.headers["WWW-Authenticate"]
    with_mfa = gateway_client(stack, idp.token("dr.house", amr=MFA))
    assert with_mfa.retrieve_instance(*vip_path).SOPInstanceUID == vip_path[2]

    # A researcher addressing the original UIDs finds nothing there (they would link the originals
    # to their pseudonyms); de-identified releases are addressed by the UIDs QIDO gave them.
    with pytest.raises(requests.HTTPError) as original_uids:
        gateway_client(stack, idp.token("res.rao")).retrieve_instance(*path)
    assert _status(original_uids) == 404
    # Nor does a sensitive study answer differently (403 or 401 would confirm the UID and why),
    # with or without MFA, nor a UID that names nothing.
    for token in (idp.token("res.rao"), idp.token("res.rao", amr=MFA)):
        for target in (vip_path, (generate_uid(), generate_uid(), generate_uid())):
            with pytest.raises(requests.HTTPError) as hidden:
                gateway_client(stack, token).retrieve_instance(*target)
            assert _status(hidden) == 404


def _values(attrs: object) -> list[str]:
    """Every value in DICOM JSON, nested sequences and person-name groups included, as strings."""
    if isinstance(attrs, dict):
        return [v for key, item in attrs.items() if key != "vr" for v in _values(item)]
    if isinstance(attrs, list):
        return [v for item in attrs for v in _values(item)]
    return [str(attrs)]


def test_researcher_qido_is_deidentified_and_retrievable(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    """What a researcher finds holds no original UID nor identifying value, and retrieves what it names."""
    research = gateway_client(stack, idp.token("res.rao"))
    ours = [d for d in upload.datasets.values() if str(d.StudyInstanceUID) != upload.vip_study]
    studies = research.search_for_studies()
    series = [se for st in studies for se in research.search_for_series(st["0020000D"]["Value"][0])]
    instances = [i for st in studies for i in research.search_for_instances(st["0020000D"]["Value"][0])]
    assert len(instances) >= len(ours)
    found = _values([*studies, *series, *instances])
    text = repr(found)
    for ds in upload.datasets.values():
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert str(uid) not in text
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyDate",
            "StudyTime",
            "AccessionNumber",
            "StudyDescription",
            "SeriesDescription",
            "ReferringPhysicianName",
            "StudyID",
        ):
            value = str(ds.get(keyword, "") or "")
            assert not value or value not in found, keyword
        assert str(ds.PatientName) not in text and str(ds.PatientID) not in text
    assert all("Value" not in s.get("00100040", {}) for s in studies)  # PatientSex emptied
    assert all(s["00120062"]["Value"] == ["YES"] for s in studies)  # Patient Identity Removed

    # Pseudonymous UIDs work as query keys too, and what QIDO names is what WADO-RS releases.
    first = studies[0]["0020000D"]["Value"][0]
    assert [
        s["0020000D"]["Value"][0] for s in research.search_for_studies(search_filters={"StudyInstanceUID": first})
    ] == [first]
    released: dict[bytes, str] = {}
    for item in instances:
        study, serie, sop = (item[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        assert item["00081190"]["Value"][0].endswith(f"/studies/{study}/series/{serie}/instances/{sop}")
        got = research.retrieve_instance(study, serie, sop)
        assert (got.StudyInstanceUID, got.SeriesInstanceUID, got.SOPInstanceUID) == (study, serie, sop)
        assert got.PatientIdentityRemoved == "YES" and str(got.PatientID) != str(ours[0].PatientID)
        if "PixelData" in got:  # other tests of the module store RT Plans, which have none
            released[bytes(got.PixelData)] = sop
    assert all(bytes(ds.PixelData) in released for ds in ours)  # every study of ours, pixels unchanged
    with pytest.raises(requests.HTTPError) as frames:
        research.retrieve_instance_frames(study, serie, sop, [1])
    assert _status(frames) == 403
    # A clinician holding a pseudonymous UID gets no identified data through it.
    with pytest.raises(requests.HTTPError) as clinician:
        gateway_client(stack, idp.token("dr.house")).retrieve_instance(study, serie, sop)
    assert _status(clinician) == 403


def test_department_scope_follows_the_study(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    """dr.cameron's role binding is scoped to cardiology: the echo study is visible, the CT is not."""
    cameron = gateway_client(stack, idp.token("dr.cameron"))
    patient_id = str(upload.datasets[next(iter(upload.originals))].PatientID)
    visible = {s["0020000D"]["Value"][0] for s in cameron.search_for_studies(search_filters={"PatientID": patient_id})}
    assert visible == {upload.us_study}
    us = next(d for d in upload.datasets.values() if d.Modality == "US")
    assert cameron.retrieve_instance(str(us.StudyInstanceUID), str(us.SeriesInstanceUID), str(us.SOPInstanceUID))
    with pytest.raises(requests.HTTPError) as outside:
        cameron.retrieve_study(upload.ct_study)
    assert _status(outside) == 403


def test_time_limited_grant_expires(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    """A locum radiologist with a grant on one study: in before expiry, out after, both audited."""
    locum = f"dr.locum-{uuid.uuid4().hex[:6]}"
    not_after = Timestamp()
    not_after.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6))
    grant = authz_pb2.Grant(
        subject=locum,
        role="radiologist",
        study_instance_uid=upload.ct_study,
        not_after=not_after,
        reason="locum cover, reporting one study",
    )

    async def create() -> None:
        # Grant management by operator tooling (authz admits "ops" and the gateway to CreateGrant).
        async with new_channel(stack.settings.target("authz"), stack.settings.client_tls("ops")) as channel:
            await authz_pb2_grpc.AuthzServiceStub(channel).CreateGrant(
                authz_pb2.CreateGrantRequest(caller=authz_pb2.Subject(access_token=idp.token("reg.omar")), grant=grant),
                timeout=10,
            )

    asyncio.run(create())
    ct_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.ct_study)
    ct = upload.datasets[ct_uid]
    path = (str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), ct_uid)
    assert gateway_client(stack, idp.token(locum)).retrieve_instance(*path).SOPInstanceUID == ct_uid
    with pytest.raises(requests.HTTPError) as other_study:
        gateway_client(stack, idp.token(locum)).retrieve_study(upload.us_study)
    assert _status(other_study) == 403
    time.sleep(7)
    with pytest.raises(requests.HTTPError) as after:
        gateway_client(stack, idp.token(locum)).retrieve_instance(*path)
    assert _status(after) == 403


def _dicom_error(response: requests.Response, status: int, comment: str) -> None:
    """A DICOMweb error: the status, a DICOM JSON body whose ErrorComment says what went wrong."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"] == "application/dicom+json"
    assert comment in response.json()["00000902"]["Value"][0]


def test_http_errors_are_dicom_json(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    root, ca = stack.settings.dicomweb_url, str(stack.settings.ca_file)
    auth = {"Authorization": f"Bearer {idp.token('dr.house')}"}
    ct_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.ct_study)
    ct = upload.datasets[ct_uid]
    instance = f"{root}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct_uid}"

    def get(url: str, **headers: str) -> requests.Response:
        return requests.get(url, headers={**auth, **headers}, verify=ca, timeout=30)

    # 400: a query or a frame list that cannot be understood.
    _dicom_error(get(f"{root}/studies?limit=many"), 400, "limit and offset must be integers")
    _dicom_error(get(f"{root}/studies?Manufacturer=ACME"), 400, "Manufacturer is not a supported matching key")
    _dicom_error(get(f"{instance}/frames/one"), 400, "frame numbers must be integers")
    # 404: nothing there (the caller may ask), a frame past the end, a path that is no route.
    _dicom_error(get(f"{root}/studies/{generate_uid()}"), 404, "no such study, series or instance")
    us = next(d for d in upload.datasets.values() if d.Modality == "US")
    frames = f"{root}/studies/{us.StudyInstanceUID}/series/{us.SeriesInstanceUID}/instances/{us.SOPInstanceUID}/frames"
    _dicom_error(get(f"{frames}/99"), 404, "no such frame")
    _dicom_error(get(f"{root}/workitems"), 404, "no such resource")
    # 405 with Allow, in the same body, instead of the framework's plain text.
    wrong = requests.delete(f"{root}/studies/{ct.StudyInstanceUID}", headers=auth, verify=ca, timeout=30)
    _dicom_error(wrong, 405, "method not allowed")
    assert wrong.headers["Allow"] == "GET, HEAD, POST"
    # 406: another transfer syntax than the stored one (no transcoding), or no acceptable type.
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    _dicom_error(get(instance, Accept=jpeg), 406, "stored transfer syntax")
    _dicom_error(get(instance, Accept="image/png"), 406, "acceptable")
    # 413: a STOW-RS part over the limit (2 MiB in this stack), refused while it streams in.
    boundary = "b" + uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + b"\0" * (stack.settings.gateway_max_instance_bytes + 65536)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    too_large = requests.post(
        f"{root}/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {idp.token('tech.jane')}",
        },
        verify=ca,
        timeout=60,
    )
    _dicom_error(too_large, 413, f"an instance exceeds {stack.settings.gateway_max_instance_bytes} bytes")
    # The gateway's own API answers in problem details, its unknown paths too.
    api = root.removesuffix("/dicomweb") + "/api/v1"
    missing = requests.get(f"{api}/studies/{ct.StudyInstanceUID}/break-glass", headers=auth, verify=ca, timeout=30)
    assert missing.status_code == 405 and missing.headers["Content-Type"] == "application/problem+json"
    assert missing.json()["status"] == 405


def _break_glass(stack: Stack, study: str, token: str | None, body: object) -> requests.Response:
    api = stack.settings.dicomweb_url.removesuffix("/dicomweb") + "/api/v1"
    return requests.post(
        f"{api}/studies/{study}/break-glass",
        json=body,
        headers={"Authorization": f"Bearer {token}"} if token else {},
        verify=str(stack.settings.ca_file),
        timeout=30,
    )


def test_break_glass_through_the_gateway(stack: Stack, idp: LocalIssuer, upload: Upload) -> None:
    """dr.er (emergency physician, no standing image access) is refused, breaks glass, reads; flagged."""
    us = next(d for d in upload.datasets.values() if d.Modality == "US")
    path = (str(us.StudyInstanceUID), str(us.SeriesInstanceUID), str(us.SOPInstanceUID))
    er = idp.token("dr.er", amr=MFA)
    with pytest.raises(requests.HTTPError) as before:
        gateway_client(stack, er).retrieve_instance(*path)
    assert _status(before) == 403

    reason = {"reason": "unconscious patient, trauma bay 2"}
    anonymous = _break_glass(stack, upload.us_study, None, reason)
    assert anonymous.status_code == 401 and anonymous.headers["Content-Type"] == "application/problem+json"
    no_reason = _break_glass(stack, upload.us_study, er, {"reason": "  "})
    assert no_reason.status_code == 400 and no_reason.json()["title"] == "a stated reason is required"
    no_mfa = _break_glass(stack, upload.us_study, idp.token("dr.er"), reason)
    assert no_mfa.status_code == 403 and "multi-factor" in no_mfa.json()["detail"]
    unprivileged = _break_glass(stack, upload.us_study, idp.token("tech.jane", amr=MFA), reason)
    assert unprivileged.status_code == 403 and "emergency.access" in unprivileged.json()["detail"]

    granted = _break_glass(stack, upload.us_study, er, reason)
    assert granted.status_code == 201, granted.text
    grant = granted.json()
    assert grant["subject"] == "dr.er" and grant["study_instance_uid"] == upload.us_study
    expires = dt.datetime.fromisoformat(grant["expires_at"])
    assert dt.timedelta(minutes=25) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=30)
    again = _break_glass(stack, upload.us_study, er, reason)
    assert again.status_code == 403 and "not renewable" in again.json()["detail"]

    retrieved = gateway_client(stack, er).retrieve_instance(*path)
    assert retrieved == pydicom.dcmread(io.BytesIO(upload.originals[path[2]]))
    # The gRPC retrieve path honours the override as well (the stored object, byte for byte).
    assert asyncio.run(_grpc_retrieve(stack, er, path[2])) == upload.originals[path[2]]
    # The override covers that one study only.
    with pytest.raises(requests.HTTPError) as other:
        gateway_client(stack, er).retrieve_study(upload.ct_study)
    assert _status(other) == 403

    records = asyncio.run(_trail(stack, idp, upload.us_study, "dr.er"))
    A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
    releases = [
        e for e in records if e.action == A.AUDIT_ACTION_INSTANCE_RETRIEVED and e.outcome == Out.AUDIT_OUTCOME_SUCCESS
    ]
    assert [e.sop_instance_uid for e in releases] == [path[2], path[2]]  # WADO-RS, then gRPC Retrieve
    assert all(e.details["break_glass"] == "true" and e.details["purpose"] == "emergency" for e in releases)
    # The refusal before the override is not flagged: only releases under it are.
    refused = [e for e in records if e.action == A.AUDIT_ACTION_INSTANCE_RETRIEVED and e not in releases]
    assert refused and all("break_glass" not in e.details for e in refused)
    overrides = [e for e in records if e.action == A.AUDIT_ACTION_EMERGENCY_OVERRIDE]
    assert any(e.outcome == Out.AUDIT_OUTCOME_SUCCESS and e.details.get("override") == "started" for e in overrides)


def test_break_glass_for_a_patients_prior_imaging(stack: Stack, idp: LocalIssuer) -> None:
    """Asked on one study with scope "patient": every study of that patient opens (sensitive ones
    with MFA, as always), no other patient's, once."""
    ct, vip = _fresh_studies(stack, idp)
    elsewhere, _ = _fresh_studies(stack, idp)  # another patient
    er = idp.token("dr.er", amr=MFA)
    reason = {"reason": "unconscious, prior imaging needed", "scope": "patient"}
    assert _break_glass(stack, str(ct.StudyInstanceUID), er, {**reason, "scope": "ward"}).status_code == 400
    assert _break_glass(stack, generate_uid(), er, reason).status_code == 404
    granted = _break_glass(stack, str(ct.StudyInstanceUID), er, reason)
    assert granted.status_code == 201, granted.text
    grant = granted.json()
    assert grant["scope"] == "patient" and re.fullmatch("[0-9a-f]{32,64}", grant["patient_ref"])
    assert not grant["study_instance_uid"]
    client = gateway_client(stack, er)
    for ds in (ct, vip):
        assert client.retrieve_instance(*_path(ds)) == ds
    with pytest.raises(requests.HTTPError) as other:
        client.retrieve_instance(*_path(elsewhere))
    assert _status(other) == 403
    again = _break_glass(stack, str(vip.StudyInstanceUID), er, reason)
    assert again.status_code == 403 and "not renewable" in again.json()["detail"]


async def _grpc_retrieve(stack: Stack, token: str, sop_uid: str) -> bytes:
    # The object id of the instance, from the gateway's own index (a viewer would have it from QIDO's
    # back end); Retrieve is for front ends holding the "viewer" certificate.
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        doc = await mongo[stack.settings.index_db]["instances"].find_one({"_id": sop_uid})
    finally:
        await mongo.close()
    assert doc is not None
    async with new_channel(stack.settings.target("gateway"), stack.settings.client_tls("viewer")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        request = retrieval_pb2.RetrieveRequest(
            access_token=token, object_id=str(doc["object_id"]), purpose="treatment"
        )
        return b"".join([p.data async for p in stub.Retrieve(request, timeout=60)])


async def _trail(stack: Stack, idp: LocalIssuer, study: str, actor: str) -> list[audit_pb2.AuditEvent]:
    """The stored audit trail (MongoDB, through audit.Query) of one actor and study, once it holds both releases."""
    auditor = idp.token("aud.ito")
    query = audit_pb2.QueryRequest(study_instance_uid=study, actor=actor, limit=500, access_token=auditor)
    deadline = time.monotonic() + 60
    async with new_channel(stack.settings.target("audit"), stack.settings.client_tls("ops")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            events = [r.event async for r in audit.Query(query)]
            released = [
                e
                for e in events
                if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
                and e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
            ]
            if len(released) >= 2 or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.5)


def _fresh_studies(stack: Stack, idp: LocalIssuer) -> tuple[FileDataset, FileDataset]:
    """A CT study and a VIP MR study of a patient of their own: the audit records about them come
    from the calling test alone, whatever ran before it."""
    patient = dicom_samples.synthetic_patient(uuid.uuid4().hex)
    ct = dicom_samples.ct_image(study_uid=generate_uid(), seed=11, patient=patient, rows=32, columns=32)
    vip = dicom_samples.mr_image(study_uid=generate_uid(), seed=12, patient=patient, rows=32, columns=32)
    vip.ConfidentialityConstraintOnPatientDataDescription = "VIP - board member"
    response = gateway_client(stack, idp.token("tech.jane", amr=MFA)).store_instances([ct, vip])
    assert "FailedSOPSequence" not in response
    return ct, vip


def _path(ds: FileDataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _grant(stack: Stack, idp: LocalIssuer, subject: str, study: str, seconds: float) -> dt.datetime:
    """A radiologist grant on one study for ``seconds``, made by a registrar; returns its end."""
    end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    not_after = Timestamp()
    not_after.FromDatetime(end)
    grant = authz_pb2.Grant(
        subject=subject, role="radiologist", study_instance_uid=study, not_after=not_after, reason="locum cover"
    )

    async def create() -> None:
        async with new_channel(stack.settings.target("authz"), stack.settings.client_tls("ops")) as channel:
            await authz_pb2_grpc.AuthzServiceStub(channel).CreateGrant(
                authz_pb2.CreateGrantRequest(caller=authz_pb2.Subject(access_token=idp.token("reg.omar")), grant=grant),
                timeout=10,
            )

    asyncio.run(create())
    return end


def _refused(call: Any) -> requests.Response:
    with pytest.raises(requests.HTTPError) as refused:
        call()
    response = refused.value.response
    assert response is not None
    return response


def test_refusals_through_the_dicomweb_client_are_audited(stack: Stack, idp: LocalIssuer) -> None:
    """QIDO-RS, WADO-RS metadata and frames without a token, with an expired grant and without MFA
    on a sensitive study: each refused, and each refusal in the audit trail with its reason."""
    ct, vip = _fresh_studies(stack, idp)
    ct_path, vip_path = _path(ct), _path(vip)
    locum = f"dr.lapsed-{uuid.uuid4().hex[:6]}"
    expires = _grant(stack, idp, locum, ct_path[0], seconds=5)
    lapsed = gateway_client(stack, idp.token(locum))
    assert lapsed.retrieve_instance_metadata(*ct_path)["00080018"]["Value"] == [ct_path[2]]  # in, before expiry
    assert len(lapsed.search_for_instances(ct_path[0])) == 1
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1)

    calls = {
        "qido": lambda c, p: c.search_for_instances(p[0]),
        "metadata": lambda c, p: c.retrieve_instance_metadata(*p),
        "frames": lambda c, p: c.retrieve_instance_frames(*p, frame_numbers=[1]),
    }
    anonymous, house = gateway_client(stack, None), gateway_client(stack, idp.token("dr.house"))
    for call in calls.values():
        response = _refused(lambda call=call: call(anonymous, ct_path))
        assert response.status_code == 401 and "Bearer" in response.headers["WWW-Authenticate"]
    for name in ("metadata", "frames"):
        assert _refused(lambda name=name: calls[name](lapsed, ct_path)).status_code == 403
        no_mfa = _refused(lambda name=name: calls[name](house, vip_path))
        # RFC 9470 step-up: 401 asking for MFA, not 403 — the same user with MFA is let in.
        assert no_mfa.status_code == 401
        assert "insufficient_user_authentication" in no_mfa.headers["WWW-Authenticate"]
    # QIDO-RS withholds the studies a caller may not see rather than refusing the whole query.
    assert lapsed.search_for_instances(ct_path[0]) == []
    assert house.search_for_instances(vip_path[0]) == []
    assert len(gateway_client(stack, idp.token("dr.house", amr=MFA)).search_for_instances(vip_path[0])) == 1

    events = [e for e in asyncio.run(_gateway_events(stack)) if e.study_instance_uid in (ct_path[0], vip_path[0])]
    A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome

    def records(actor: str, study: str, outcome: int) -> dict[str, list[audit_pb2.AuditEvent]]:
        """Records of one actor on one study with one outcome, by route part (QIDO: "qido")."""
        out: dict[str, list[audit_pb2.AuditEvent]] = {}
        for e in events:
            if (e.actor, e.study_instance_uid, e.outcome) == (actor, study, outcome):
                out.setdefault(
                    e.details["part"] if e.action == A.AUDIT_ACTION_INSTANCE_RETRIEVED else "qido", []
                ).append(e)
        return out

    anonymous_denied = records("unauthenticated", ct_path[0], Out.AUDIT_OUTCOME_DENIED)
    assert set(anonymous_denied) == {"qido", "metadata", "frames"}
    assert all(e.reason == "no access token" for part in anonymous_denied.values() for e in part)
    assert anonymous_denied["qido"][0].action == A.AUDIT_ACTION_STUDY_QUERIED

    # The expired grant: the same locum released the study before the end and was denied after it.
    released = records(locum, ct_path[0], Out.AUDIT_OUTCOME_SUCCESS)
    assert [e.occurred_at.ToDatetime(dt.UTC) < expires for e in released["metadata"]] == [True]
    lapsed_denied = records(locum, ct_path[0], Out.AUDIT_OUTCOME_DENIED)
    assert set(lapsed_denied) == {"metadata", "frames"}
    for part in lapsed_denied.values():
        assert [e.occurred_at.ToDatetime(dt.UTC) > expires for e in part] == [True]
        assert part[0].reason not in ("unauthenticated", "mfa_required", "no access token")
    after = [e for e in released["qido"] if e.occurred_at.ToDatetime(dt.UTC) > expires]
    assert [(e.details["results"], e.details["withheld"]) for e in after] == [("0", "1")]

    house_denied = records("dr.house", vip_path[0], Out.AUDIT_OUTCOME_DENIED)
    assert set(house_denied) == {"metadata", "frames"}
    assert all(e.reason == "mfa_required" for part in house_denied.values() for e in part)
    withheld = records("dr.house", vip_path[0], Out.AUDIT_OUTCOME_SUCCESS)["qido"]
    assert [(e.details["results"], e.details["withheld"]) for e in withheld][:1] == [("0", "1")]


def test_unanswered_wado_requests_are_audited(stack: Stack, idp: LocalIssuer) -> None:
    """Allowed to ask, yet nothing released — 404, 406, a researcher's frames or bulk data: each
    leaves a record with the outcome and why."""
    ct, _ = _fresh_studies(stack, idp)
    ct_path = _path(ct)
    house = gateway_client(stack, idp.token("dr.house"))
    assert _refused(lambda: house.retrieve_instance_frames(*ct_path, frame_numbers=[99])).status_code == 404
    jpeg = (("application/dicom", "1.2.840.10008.1.2.4.50"),)
    assert _refused(lambda: house.retrieve_instance(*ct_path, media_types=jpeg)).status_code == 406
    nowhere = generate_uid()
    assert _refused(lambda: house.retrieve_study(nowhere)).status_code == 404

    async def pseudonyms() -> tuple[str, str, str]:
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
        try:
            db = mongo[stack.settings.index_db]
            docs = [
                await db[c].find_one({"_id": u})
                for c, u in zip(("studies", "series", "instances"), ct_path, strict=True)
            ]
        finally:
            await mongo.close()
        assert all(docs)
        return tuple(str(d["pseudo_uid"]) for d in docs if d)  # type: ignore[return-value]

    pseudo = asyncio.run(pseudonyms())
    research = gateway_client(stack, idp.token("res.rao"))
    assert research.retrieve_instance(*pseudo).SOPInstanceUID == pseudo[2]  # allowed, de-identified
    assert _refused(lambda: research.retrieve_instance_frames(*pseudo, frame_numbers=[1])).status_code == 403
    bulk = (
        f"{stack.settings.dicomweb_url}/studies/{pseudo[0]}/series/{pseudo[1]}/instances/{pseudo[2]}/bulkdata/7fe00010"
    )
    assert _refused(lambda: research.retrieve_bulkdata(bulk)).status_code == 403

    events = [
        e
        for e in asyncio.run(_gateway_events(stack))
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
        and e.study_instance_uid in (ct_path[0], nowhere)
    ]
    Out = audit_pb2.AuditOutcome
    got = {(e.actor, e.outcome, e.details["part"], e.details.get("status"), e.reason) for e in events}
    assert ("dr.house", Out.AUDIT_OUTCOME_FAILURE, "frames:99", "404", "no such frame") in got
    assert (
        "dr.house",
        Out.AUDIT_OUTCOME_FAILURE,
        "instance",
        "406",
        "instances are served only in their stored transfer syntax",
    ) in got
    assert ("dr.house", Out.AUDIT_OUTCOME_FAILURE, "instance", "404", "not found") in got
    refused = "not released under de-identification"
    assert ("res.rao", Out.AUDIT_OUTCOME_DENIED, "frames:1", "403", f"frames are {refused}") in got
    assert ("res.rao", Out.AUDIT_OUTCOME_DENIED, "bulkdata", "403", f"bulk data is {refused}") in got
    assert all(e.sop_instance_uid == ct_path[2] for e in events if e.details.get("status") == "403")


def test_wado_uri_serves_the_stored_instance_under_the_same_rules(
    stack: Stack, idp: LocalIssuer, upload: Upload
) -> None:
    """WADO-URI (PS3.18 chapter 9): the exact stored file for an allowed caller, the same refusals
    as WADO-RS, every outcome on the trail."""
    ct_uid = next(u for u, d in upload.datasets.items() if str(d.StudyInstanceUID) == upload.ct_study)
    ct = upload.datasets[ct_uid]
    query = {"requestType": "WADO", "studyUID": str(ct.StudyInstanceUID), "seriesUID": str(ct.SeriesInstanceUID)}
    query |= {"objectUID": ct_uid, "contentType": "application/dicom"}

    def get(token: str | None, **change: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(
            f"{stack.settings.dicomweb_url}/wado",
            params={k: v for k, v in (query | change).items() if v},
            headers=headers,
            verify=str(stack.settings.ca_file),
            timeout=30,
        )

    house = idp.token("dr.house")
    served = get(house)
    assert served.status_code == 200 and served.headers["Content-Type"] == "application/dicom"
    assert served.content == upload.originals[ct_uid]
    assert get(house, transferSyntax=str(ct.file_meta.TransferSyntaxUID)).content == upload.originals[ct_uid]
    assert get(None).status_code == 401
    assert get(idp.token("tech.jane")).status_code == 403
    assert get(idp.token("res.rao")).status_code == 404  # original UIDs under de-identification
    _dicom_error(get(house, requestType="QIDO"), 400, "requestType must be WADO")
    _dicom_error(get(house, objectUID=""), 400, "objectUID are required")
    _dicom_error(get(house, contentType=""), 406, "no rendered images")
    _dicom_error(get(house, contentType="image/jpeg"), 406, "no rendered images")
    _dicom_error(get(house, transferSyntax="1.2.840.10008.1.2.4.50"), 406, "stored transfer syntax")

    events = [
        e
        for e in asyncio.run(_gateway_events(stack))
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
        and e.details.get("part") == "wado-uri"
        and e.sop_instance_uid == ct_uid  # other tests of the module read other instances by WADO-URI
    ]
    Out = audit_pb2.AuditOutcome
    got = [(e.actor, e.outcome, e.details.get("status", "")) for e in events]
    assert got.count(("dr.house", Out.AUDIT_OUTCOME_SUCCESS, "")) == 2
    assert got.count(("dr.house", Out.AUDIT_OUTCOME_FAILURE, "406")) == 3
    assert ("unauthenticated", Out.AUDIT_OUTCOME_DENIED, "") in got  # no token
    assert ("tech.jane", Out.AUDIT_OUTCOME_DENIED, "") in got
    assert ("res.rao", Out.AUDIT_OUTCOME_DENIED, "") in got


def _tamper(stack: Stack, sop_uid: str, chunk: int = 0) -> None:
    """Flip one byte inside ciphertext chunk ``chunk`` of the instance's sealed object on disk."""

    async def object_id() -> str:
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
        try:
            doc = await mongo[stack.settings.index_db]["instances"].find_one({"_id": sop_uid})
        finally:
            await mongo.close()
        assert doc is not None
        return str(doc["object_id"])

    path = next((stack.settings.work_dir / "store").rglob(f"{asyncio.run(object_id())}.dso"))
    raw = bytearray(path.read_bytes())
    header, header_len = fmt.read_header(io.BytesIO(bytes(raw)))
    raw[header_len + chunk * (header.chunk_size + fmt.TAG_SIZE) + 8] ^= 0x01
    path.write_bytes(bytes(raw))


def test_tampered_object_answers_500_and_is_audited(stack: Stack, idp: LocalIssuer) -> None:
    """A sealed object failing authentication: WADO-RS instance, frames and WADO-URI answer 500
    with a DICOM error before any byte of it leaves, and the failure is on the trail."""
    ct, _ = _fresh_studies(stack, idp)
    path = _path(ct)
    _tamper(stack, path[2])
    headers = {"Authorization": f"Bearer {idp.token('dr.house')}"}
    base = f"{stack.settings.dicomweb_url}/studies/{path[0]}/series/{path[1]}/instances/{path[2]}"
    wado_uri = {"requestType": "WADO", "studyUID": path[0], "seriesUID": path[1], "objectUID": path[2]}
    for url, params in (
        (base, {}),
        (f"{base}/frames/1", {}),
        (f"{stack.settings.dicomweb_url}/wado", {**wado_uri, "contentType": "application/dicom"}),
    ):
        response = requests.get(url, params=params, headers=headers, verify=str(stack.settings.ca_file), timeout=30)
        _dicom_error(response, 500, "stored object failed its integrity check")

    events = [
        e
        for e in asyncio.run(_gateway_events(stack))
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED and e.sop_instance_uid == path[2]
    ]
    got = {(e.details["part"], e.outcome, e.reason) for e in events if e.actor == "dr.house"}
    failure = audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE
    for part in ("instance", "frames:1", "wado-uri"):
        assert (part, failure, "stored object failed its integrity check") in got
    # Nothing was released: no success record of this instance.
    assert all(outcome == failure for _, outcome, _ in got)


def test_tampered_object_streamed_fails_visibly(stack: Stack, idp: LocalIssuer) -> None:
    """Above GATEWAY_VERIFY_BEFORE_SEND_BYTES a response streams; a chunk failing authentication
    midway must break the response for the client (no terminating chunk, no closing boundary),
    never end it as if complete, and the failure is on the trail."""
    patient = dicom_samples.synthetic_patient(uuid.uuid4().hex)
    # 512 x 512 x 16 bits: over the stack's 512 KiB threshold, three sealed chunks of 256 KiB.
    big = dicom_samples.ct_image(study_uid=generate_uid(), seed=21, patient=patient, rows=512, columns=512)
    response = gateway_client(stack, idp.token("tech.jane", amr=MFA)).store_instances([big])
    assert "FailedSOPSequence" not in response
    path = _path(big)
    _tamper(stack, path[2], chunk=1)  # chunk 0 is released before the failure is found
    token = idp.token("dr.house")
    base = f"{stack.settings.dicomweb_url}/studies/{path[0]}/series/{path[1]}/instances/{path[2]}"
    wado_uri = {"requestType": "WADO", "studyUID": path[0], "seriesUID": path[1], "objectUID": path[2]}
    for url, params in (
        (base, {}),
        (f"{stack.settings.dicomweb_url}/wado", {**wado_uri, "contentType": "application/dicom"}),
    ):
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(
                url,
                params=params,
                headers={"Authorization": f"Bearer {token}"},
                verify=str(stack.settings.ca_file),
                timeout=30,
            )  # reads the whole body (stream=False), so the broken response raises here
    # A real DICOMweb client sees the failure too, instead of a short instance.
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        gateway_client(stack, token).retrieve_instance(*path)

    events = [
        e
        for e in asyncio.run(_gateway_events(stack))
        if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED and e.sop_instance_uid == path[2]
    ]
    failures = {e.details["part"] for e in events if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE}
    assert {"instance", "wado-uri"} <= failures


def test_tls_is_13_only(stack: Stack) -> None:
    host, port = "127.0.0.1", stack.settings.https_port
    old = ssl.create_default_context(cafile=str(stack.settings.ca_file))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, port), timeout=10) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname=host)
    modern = ssl.create_default_context(cafile=str(stack.settings.ca_file))
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        modern.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() == "TLSv1.3"


def test_every_dicomweb_call_is_audited(stack: Stack, upload: Upload) -> None:
    """Runs last in this module: the calls above, allowed and refused, are all in audit.events."""
    events = asyncio.run(_gateway_events(stack))
    retrieved = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED]
    queried = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_STUDY_QUERIED]
    denied = [e for e in retrieved if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED]
    reasons = {e.reason for e in denied}
    assert "no access token" in reasons and "unauthenticated" in reasons and "mfa_required" in reasons
    # The locum's grant covered the CT study alone: a denial there is the expired grant's.
    assert any(e.actor.startswith("dr.locum-") and e.study_instance_uid == upload.ct_study for e in denied)
    released = [e for e in retrieved if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS]
    assert {e.sop_instance_uid for e in released} >= {u for u, d in upload.datasets.items() if d.Modality != "MR"}
    assert any(e.details.get("deidentified") == "true" and e.actor == "res.rao" for e in released)
    assert any(e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS and e.actor == "res.rao" for e in queried)
    stored = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_STORED]
    assert {e.sop_instance_uid for e in stored} >= set(upload.originals)
    assert all(e.actor == "tech.jane" for e in stored if e.sop_instance_uid in upload.originals)


async def _gateway_events(stack: Stack) -> list[audit_pb2.AuditEvent]:
    """Everything on the audit topic so far: read until it has been quiet for a few seconds."""
    topic = Topics(stack.settings.topic_prefix).audit
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=stack.settings.kafka_bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    events: list[audit_pb2.AuditEvent] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 5:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                events.extend(audit_pb2.AuditEvent.FromString(r.value or b"") for r in records)
            if batch:
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return [e for e in events if e.service in ("gateway", "ingest")]


def test_a_browser_viewer_of_the_allowed_origin_may_call_and_read_errors(stack: Stack, idp: LocalIssuer) -> None:
    url = f"{stack.settings.dicomweb_url}/studies"
    ca = str(stack.settings.ca_file)
    preflight = requests.options(
        url,
        headers={
            "Origin": VIEWER_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=30,
        verify=ca,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    # The 401 a viewer must react to is readable by it, WWW-Authenticate included.
    anonymous = requests.get(url, headers={"Origin": VIEWER_ORIGIN}, timeout=30, verify=ca)
    assert anonymous.status_code == 401
    assert anonymous.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    assert "WWW-Authenticate" in anonymous.headers["Access-Control-Expose-Headers"]
    signed_in = requests.get(
        url,
        params={"PatientID": "nobody"},
        headers={"Origin": VIEWER_ORIGIN, "Authorization": f"Bearer {idp.token('dr.house')}"},
        timeout=30,
        verify=ca,
    )
    assert signed_in.status_code in (200, 204)
    assert signed_in.headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    elsewhere = requests.get(url, headers={"Origin": "https://evil.example"}, timeout=30, verify=ca)
    assert "Access-Control-Allow-Origin" not in elsewhere.headers
