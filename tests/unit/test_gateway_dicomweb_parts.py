"""The gateway's pure parts: multipart/related streaming, instance layout, QIDO matching, Annex E."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import generate_fragments
from pydicom.uid import JPEG2000Lossless, RLELossless

from services.gateway.deidentify import KEPT, PSEUDONYMOUS, WITHHELD, Deidentifier, matching_treatment
from services.gateway.index_entry import entry_for, sensitivity_labels
from services.gateway.instance_layout import layout_of
from services.gateway.multipart import (
    MultipartError,
    PartTooLarge,
    between,
    closing,
    opening,
    parse_parts,
    part_header,
)
from services.gateway.study_index import MATCHABLE, QueryError, matching_filter
from tools import dicom_samples


def _body(boundary: str, bodies: list[bytes]) -> bytes:
    out = b"preamble, ignored\r\n"
    for i, body in enumerate(bodies):
        out += (opening(boundary) if i == 0 else between(boundary)) + part_header("application/dicom") + body
    return out + closing(boundary) + b"epilogue, ignored"


async def _chunks(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    pos = 0
    for size in sizes:
        yield data[pos : pos + size]
        pos += size
    yield data[pos:]


async def _parse(data: bytes, boundary: str, sizes: list[int], limit: int = 1 << 20) -> list[bytes]:
    return [p.body async for p in parse_parts(_chunks(data, sizes), boundary, limit)]


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=64), max_size=40),
)
async def test_parts_survive_any_chunking(bodies: list[bytes], sizes: list[int]) -> None:
    boundary = "dicomsafe-test-boundary"
    # A body that happens to contain CRLF, dashes or a partial boundary must come back intact.
    bodies = [b.replace(b"--dicomsafe-test-boundary", b"--x") for b in bodies]
    assert await _parse(_body(boundary, bodies), boundary, sizes) == bodies


async def test_oversized_part_and_truncated_body_are_refused() -> None:
    boundary = "b0"
    with pytest.raises(PartTooLarge):
        await _parse(_body(boundary, [b"x" * 5000]), boundary, [100] * 100, limit=1000)
    whole = _body(boundary, [b"abc"])
    with pytest.raises(MultipartError):
        await _parse(whole[: whole.index(b"--b0--")], boundary, [])
    with pytest.raises(MultipartError):
        await _parse(whole, "", [])
    with pytest.raises(MultipartError):
        await _parse(whole, "b" * 201, [])


async def test_boundaries_longer_than_rfc_2046_allows_are_taken() -> None:
    # Orthanc's DICOMweb client joins two UUIDs: 73 characters, over RFC 2046's 70.
    boundary = "42ab87be-be56-42ab-b322-2ec718a448d3-42ab87be-be56-42ab-b322-2ec718a448d3"
    assert await _parse(_body(boundary, [b"one", b"two"]), boundary, [7] * 20) == [b"one", b"two"]


def test_native_multiframe_frames_are_exact_byte_ranges() -> None:
    us = dicom_samples.us_multiframe(frames=4, rows=16, columns=24, seed=1)
    data = dicom_samples.to_bytes(us)
    ds, layout = layout_of(data)
    size = 16 * 24 * 3
    assert not layout.encapsulated and len(layout.frames) == 4
    for i, frame in enumerate(layout.frames):
        ((offset, length),) = frame
        assert data[offset : offset + length] == us.PixelData[i * size : (i + 1) * size]
    assert pydicom.dcmread(io.BytesIO(data[: layout.header_length])).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_encapsulated_frames_map_to_their_fragments(syntax: pydicom.uid.UID) -> None:
    source = dicom_samples.grayscale_multiframe(frames=3, rows=32, columns=32, seed=2)
    data = dicom_samples.to_bytes(dicom_samples.compress_lossless(source, syntax))
    _, layout = layout_of(data)
    fragments = list(generate_fragments(pydicom.dcmread(io.BytesIO(data)).PixelData))[1:]  # [0] = offset table
    assert layout.encapsulated
    assert [b"".join(data[o : o + n] for o, n in frame) for frame in layout.frames] == fragments


def test_bundled_files_have_a_layout() -> None:
    for path in dicom_samples.bundled_files():
        data = path.read_bytes()
        try:
            _, layout = layout_of(data)
        except Exception as exc:
            pytest.fail(f"{path.name}: {type(exc).__name__}")
        assert layout.header_length <= len(data)


def test_qido_matching_rules() -> None:
    assert matching_filter("study", {"PatientID": "P1"}) == {"match.PatientID": "P1"}
    assert matching_filter("study", {"PatientName": "doe*"}) == {
        "match.PatientName": {"$regex": "^doe.*$", "$options": "i"}
    }
    assert matching_filter("study", {"StudyDate": "20200101-20201231"}) == {
        "match.StudyDate": {"$gte": "20200101", "$lte": "20201231\uffff"}
    }
    assert matching_filter("study", {"StudyInstanceUID": "1.2,1.3"}) == {
        "match.StudyInstanceUID": {"$in": ["1.2", "1.3"]}
    }
    assert matching_filter("study", {"ModalitiesInStudy": "CT"}) == {"modalities": "CT"}
    assert matching_filter("study", {"AccessionNumber": ""}) == {}  # universal matching
    # Regex metacharacters in a value are literals, not a pattern.
    assert matching_filter("study", {"AccessionNumber": "A.1*"})["match.AccessionNumber"]["$regex"] == r"^A\.1.*$"
    # Fuzzy: any name component's start, any case; other keys and wildcards as before.
    fuzzy = matching_filter("study", {"PatientName": "do.e", "PatientID": "P1"}, fuzzy=True)
    assert fuzzy == {
        "match.PatientName": {"$regex": r"(^|[\^ =])do\.e", "$options": "i"},
        "match.PatientID": "P1",
    }
    assert matching_filter("study", {"PatientName": "doe*"}, fuzzy=True)["match.PatientName"]["$regex"] == "^doe.*$"
    with pytest.raises(QueryError):
        matching_filter("study", {"PixelData": "x"})
    with pytest.raises(QueryError):
        matching_filter("study", {"StudyDate": "yesterday"})


def test_index_keeps_only_query_attributes_and_labels_sensitive_studies() -> None:
    ct = dicom_samples.ct_image(rows=16, columns=16, seed=3)
    ct.ConfidentialityConstraintOnPatientDataDescription = "Mental health unit"
    ds, layout = layout_of(dicom_samples.to_bytes(ct))
    entry = entry_for(ds, layout, "ab" * 32, 1234, "ref-1")
    assert entry.labels == ("mental_health",)
    kept = set(entry.study["match"]) | set(entry.series["match"]) | set(entry.instance["match"])
    assert "PatientAddress" not in kept and "PixelData" not in kept and "PatientName" in kept
    other = dicom_samples.mr_image(rows=16, columns=16)
    other.ConfidentialityConstraintOnPatientDataDescription = "court order"
    assert sensitivity_labels(other) == ("restricted",)


def test_deidentification_is_annex_e_and_stable() -> None:
    ct = dicom_samples.ct_image(rows=16, columns=16, seed=4)
    data = dicom_samples.to_bytes(ct)
    first = pydicom.dcmread(io.BytesIO(Deidentifier(b"k" * 32).instance(data)))
    again = pydicom.dcmread(io.BytesIO(Deidentifier(b"k" * 32).instance(data)))
    other_key = pydicom.dcmread(io.BytesIO(Deidentifier(b"j" * 32).instance(data)))
    assert str(first.PatientName) != str(ct.PatientName) and first.get("PatientID", "") != ct.PatientID
    assert dicom_samples.SYNTHETIC_MARKER.decode() not in str(first)
    assert first.PatientIdentityRemoved == "YES"
    assert first.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    # Same key → same pseudonymous UIDs (series reassemble); another key → unlinkable.
    assert first.StudyInstanceUID == again.StudyInstanceUID != ct.StudyInstanceUID
    assert first.StudyInstanceUID != other_key.StudyInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.PixelData == ct.PixelData
    with pytest.raises(ValueError):
        Deidentifier(b"short")


def test_deidentified_query_results_and_matching_follow_annex_e() -> None:
    ct = dicom_samples.ct_image(rows=16, columns=16, seed=5)
    _, layout = layout_of(dicom_samples.to_bytes(ct))
    entry = entry_for(ct, layout, "cd" * 32, 99)
    attrs = {**entry.study["json"], **entry.series["json"], **entry.instance["json"]}
    deid = Deidentifier(b"k" * 32)
    result = deid.query_result(attrs)
    released = pydicom.dcmread(io.BytesIO(deid.instance(dicom_samples.to_bytes(ct))))
    # The UIDs a researcher finds are those of the instance they retrieve.
    for tag, keyword in (
        ("0020000D", "StudyInstanceUID"),
        ("0020000E", "SeriesInstanceUID"),
        ("00080018", "SOPInstanceUID"),
    ):
        assert result[tag]["Value"] == [str(released[keyword].value)] != [str(ct[keyword].value)]
    text = repr(result)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "StudyDescription"):
        assert str(ct[keyword].value) not in text, keyword
    assert result["00080060"]["Value"] == [ct.Modality] and result["00120062"]["Value"] == ["YES"]
    # Matching: only what the profile keeps, UIDs as pseudonyms, anything else (even unknown) refused.
    every_key = set().union(*MATCHABLE.values())
    assert {k for k in every_key if matching_treatment(k) == KEPT} == {
        "ModalitiesInStudy",
        "Modality",
        "SeriesNumber",
        "SOPClassUID",
        "InstanceNumber",
    }
    assert {k for k in every_key if matching_treatment(k) == PSEUDONYMOUS} == {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    }
    for key in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber", "NoSuchKey"):
        assert matching_treatment(key) == WITHHELD
