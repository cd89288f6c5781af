from __future__ import annotations

import pytest

from services.ingest.validation import InvalidInstance, validate_instance
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
