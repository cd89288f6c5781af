from __future__ import annotations

import io

import pydicom
import pytest

from dicomsafe.dicom.validation import InvalidInstance, check_instance, parse_instance, validate_instance
from tools import dicom_samples

LIMIT = 64 * 1024 * 1024

EXPECTED_CODES = {
    "empty": "empty",
    "not_dicom": "not_dicom",
    "plain_text": "not_dicom",
    "no_preamble_garbage": "not_dicom",
    "magic_then_garbage": {"unparseable", "missing_uid"},
    "no_file_meta": {"not_dicom", "unparseable", "missing_uid"},
    "truncated": "truncated",
    "missing_sop_instance_uid": "missing_uid",
    "missing_study_instance_uid": "missing_uid",
}


@pytest.mark.parametrize("name", sorted(dicom_samples.malformed_samples()))
def test_malformed_inputs_are_rejected_with_a_named_rule(name: str) -> None:
    data = dicom_samples.malformed_samples()[name]
    with pytest.raises(InvalidInstance) as info:
        validate_instance(data, LIMIT)
    expected = EXPECTED_CODES[name]
    allowed = {expected} if isinstance(expected, str) else expected
    assert info.value.code in allowed


def test_reasons_never_quote_values_from_the_file() -> None:
    ds = dicom_samples.ct_image(study_uid=None, seed=3)
    data = dicom_samples.to_bytes(ds)
    cut = data[: len(data) // 2]
    with pytest.raises(InvalidInstance) as info:
        validate_instance(cut, LIMIT)
    text = str(info.value)
    assert str(ds.PatientName) not in text
    assert str(ds.SOPInstanceUID) not in text


def test_oversized_instance_is_rejected_before_parsing() -> None:
    data = dicom_samples.to_bytes(dicom_samples.mr_image(study_uid=None, seed=1))
    with pytest.raises(InvalidInstance) as info:
        validate_instance(data, len(data) - 1)
    assert info.value.code == "oversized"


@pytest.mark.parametrize(
    "make",
    [
        lambda: dicom_samples.ct_image(study_uid=None, seed=1),
        lambda: dicom_samples.mr_image(study_uid=None, seed=2),
        lambda: dicom_samples.us_multiframe(study_uid=None, seed=3, frames=4),
        lambda: dicom_samples.rle_lossless_ct(study_uid=None, seed=4),
        lambda: dicom_samples.jpegls_lossless_ct(study_uid=None, seed=5),
        lambda: dicom_samples.jpeg2000_lossless_ct(study_uid=None, seed=6),
    ],
    ids=["ct", "mr-implicit", "us-multiframe", "rle", "jpegls", "j2k"],
)
def test_generated_instances_are_accepted_with_their_identifiers(make: object) -> None:
    ds = make()  # type: ignore[operator]
    data = dicom_samples.to_bytes(ds)
    facts = validate_instance(data, LIMIT)
    assert facts.sop_instance_uid == ds.SOPInstanceUID
    assert facts.study_instance_uid == ds.StudyInstanceUID
    assert facts.series_instance_uid == ds.SeriesInstanceUID
    assert facts.sop_class_uid == ds.SOPClassUID
    assert facts.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert facts.size == len(data)


@pytest.mark.parametrize("path", dicom_samples.bundled_files(), ids=lambda p: p.name)
def test_pydicom_bundled_files_are_accepted(path: object) -> None:
    data = path.read_bytes()  # type: ignore[attr-defined]
    facts = validate_instance(data, LIMIT)
    assert facts.sop_instance_uid
    assert facts.study_instance_uid


# Real-world files other archives store: (file, warnings expected). RT Dose's file meta names
# another SOP Instance UID than its dataset; RT Plan likewise, and has no pixel data; the YBR_FULL_422
# image holds 4:2:2 subsampled pixels (two samples a pixel, not three).
REAL_WORLD = {
    "rtdose.dcm": ("meta_sop_instance_uid_mismatch",),
    "rtplan.dcm": ("meta_sop_instance_uid_mismatch",),
    "SC_ybr_full_422_uncompressed.dcm": (),
}


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_world_files_other_archives_accept_are_accepted(name: str) -> None:
    path = dicom_samples._bundled_path(name)
    data = path.read_bytes()
    facts = validate_instance(data, LIMIT)
    ds = pydicom.dcmread(path)
    # The dataset's UIDs are the instance's identity, whatever the file meta says.
    assert facts.sop_instance_uid == ds.SOPInstanceUID
    assert facts.sop_class_uid == ds.SOPClassUID
    assert facts.warnings == REAL_WORLD[name]
    assert all(str(ds.SOPInstanceUID) not in w for w in facts.warnings)


def test_meta_naming_another_sop_class_is_a_warning() -> None:
    ds = dicom_samples.ct_image(study_uid=None, seed=8)
    data = dicom_samples.to_bytes(ds)
    # pydicom rewrites the file meta's UIDs from the dataset on saving: edit the written meta
    # instead (CT Image Storage ...1.1.2 becomes MR Image Storage ...1.1.4, the same length).
    meta_end = data.index(str(ds.SOPInstanceUID).encode())
    ct, mr = str(pydicom.uid.CTImageStorage).encode(), str(pydicom.uid.MRImageStorage).encode()
    assert data[:meta_end].count(ct) == 1 and len(ct) == len(mr)
    facts = validate_instance(data[:meta_end].replace(ct, mr) + data[meta_end:], LIMIT)
    assert facts.warnings == ("meta_sop_class_uid_mismatch",)
    assert facts.sop_class_uid == pydicom.uid.CTImageStorage


@pytest.mark.parametrize(
    ("photometric", "samples", "bits", "frames"),
    [("YBR_FULL_422", 3, 8, 1), ("YBR_PARTIAL_422", 3, 8, 2), ("MONOCHROME2", 1, 1, 3), ("RGB", 3, 8, 2)],
)
def test_pixel_length_follows_subsampling_packing_and_frames(
    photometric: str, samples: int, bits: int, frames: int
) -> None:
    rows, cols = 10, 14  # 1-bit: 140 pixels a frame, 17.5 bytes: frames pack across byte bounds
    per_frame_bits = rows * cols * (2 if photometric.endswith("_422") else samples) * bits
    length = (per_frame_bits * frames + 7) // 8
    ds = dicom_samples.ct_image(study_uid=None, seed=9, rows=rows, columns=cols)
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    for delta, accepted in ((0, True), (-1, False)):
        ds.PixelData = b"\x01" * (length + delta + (length + delta) % 2)  # padded to even as written
        data = dicom_samples.to_bytes(ds)
        if accepted:
            validate_instance(data, LIMIT)
            continue
        if (length - 1) % 2 == 1:  # one byte short, padded back up to the same even length: no cut
            continue
        with pytest.raises(InvalidInstance) as info:
            validate_instance(data, LIMIT)
        assert info.value.code == "truncated"
        assert info.value.reason == f"pixel data holds {length - 1} of {length} bytes"


@pytest.mark.parametrize(
    "data",
    [
        *(path.read_bytes() for path in dicom_samples.bundled_files()),
        dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=None, seed=10, frames=3)),
        dicom_samples.to_bytes(dicom_samples.rle_lossless_ct(study_uid=None, seed=11)),
        dicom_samples.to_bytes(dicom_samples.mr_image(study_uid=None, seed=12)),
    ],
)
def test_one_parse_finds_the_pixel_data_where_a_header_read_stops(data: bytes) -> None:
    # STOW-RS parses each part once: the offset it frames byte ranges by must be the header read's.
    fp = io.BytesIO(data)
    pydicom.dcmread(fp, stop_before_pixels=True)
    parsed = parse_instance(data, LIMIT)
    assert parsed.header_end == fp.tell()
    assert check_instance(parsed) == validate_instance(data, LIMIT)


def _converts_every_value(data: bytes) -> bool:
    """The reference the validator is held to: pydicom converting every element (iterall)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for _ in ds.iterall():
            pass
    except Exception:
        return False
    return True


def _with_sequences() -> bytes:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = dicom_samples.ct_image(study_uid=None, seed=11, rows=64, columns=64)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "X1", "DCM"
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "ABCDEFGH", "meaning"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item, item])
    return dicom_samples.to_bytes(ds)


@pytest.mark.filterwarnings("ignore")
def test_mutated_instances_are_refused_whenever_converting_every_value_refuses_them() -> None:
    """Validation converts sequences only and checks the other elements raw (cheaper): on bytes
    mutated in and around nested sequences it must refuse everything full conversion refuses."""
    import random

    data = _with_sequences()
    start = data.find(b"\x08\x00\x32\x10")  # (0008,1032) Procedure Code Sequence
    assert start > 0
    rng = random.Random(5)
    refused = 0
    for _ in range(1500):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(start - 200, start + 160)] = rng.randrange(256)
        sample = bytes(mutated)
        reference = _converts_every_value(sample)
        try:
            parse_instance(sample, LIMIT)
            accepted = True
        except InvalidInstance:
            accepted = False
        assert accepted <= reference, "accepted an instance that full conversion refuses"
        refused += not reference
    assert refused > 100  # the mutations do reach the sequences
