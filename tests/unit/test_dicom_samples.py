"""Tests for tools.dicom_samples: every sample must be what it claims to be."""

from __future__ import annotations

import io
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file as original_get_testdata_file
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from tools import dicom_samples as ds_mod
from tools.dicom_samples import (
    LOSSLESS_TRANSFER_SYNTAXES,
    SYNTHETIC_MARKER,
    bundled_files,
    bundled_transfer_syntax_variants,
    compress_lossless,
    ct_image,
    grayscale_multiframe,
    jpeg2000_lossless_ct,
    jpegls_lossless_ct,
    malformed_samples,
    mr_image,
    rle_lossless_ct,
    sample_study_set,
    sized_instance,
    synthetic_patient,
    to_bytes,
    us_multiframe,
)

pytestmark = pytest.mark.unit

UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # pydicom's get_testdata_file downloads by default; make any attempt fail
    # loudly instead of passing on a laptop and hanging in CI.
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def _read(data: bytes) -> FileDataset:
    return dcmread(io.BytesIO(data))


def _assert_part10(data: bytes) -> None:
    assert len(data) > 132
    assert data[128:132] == b"DICM"


# --------------------------------------------------------------------------
# Bundled files
# --------------------------------------------------------------------------


def test_bundled_files_are_local_valid_images() -> None:
    paths = bundled_files()
    assert len(paths) >= 5
    sop_uids = set()
    for path in paths:
        assert path.is_file(), path
        ds = dcmread(path)
        assert ds.SOPInstanceUID and ds.StudyInstanceUID and ds.SOPClassUID, path.name
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, path.name
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID, path.name
        assert ds.pixel_array.size > 0, path.name
        sop_uids.add(ds.SOPInstanceUID)
    # A UID-keyed store would silently merge duplicates.
    assert len(sop_uids) == len(paths)


def test_bundled_files_cover_compressed_and_multiframe() -> None:
    datasets = [dcmread(p) for p in bundled_files()]
    syntaxes = {UID(d.file_meta.TransferSyntaxUID) for d in datasets}
    assert any(ts.is_compressed for ts in syntaxes)
    assert RLELossless in syntaxes and JPEG2000Lossless in syntaxes
    assert any(int(d.get("NumberOfFrames", 1)) > 1 for d in datasets)
    assert {d.Modality for d in datasets} >= {"CT", "MR", "US"}


def test_bundled_variants_share_uid_and_decode_identically() -> None:
    datasets = [dcmread(p) for p in bundled_transfer_syntax_variants()]
    assert len({d.SOPInstanceUID for d in datasets}) == 1
    assert len({d.file_meta.TransferSyntaxUID for d in datasets}) == len(datasets)
    reference = datasets[0].pixel_array
    for d in datasets[1:]:
        assert np.array_equal(d.pixel_array, reference), d.file_meta.TransferSyntaxUID.name


# --------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------

Case = tuple[Callable[[int], FileDataset], UID, UID, int, tuple[int, ...]]

CASES: dict[str, Case] = {
    "ct": (lambda s: ct_image(seed=s), CTImageStorage, ExplicitVRLittleEndian, 1, (512, 512)),
    "mr": (lambda s: mr_image(seed=s), MRImageStorage, ImplicitVRLittleEndian, 1, (256, 256)),
    "us": (
        lambda s: us_multiframe(seed=s, frames=4),
        UltrasoundMultiFrameImageStorage,
        ExplicitVRLittleEndian,
        4,
        (4, 480, 640, 3),
    ),
    "mf": (
        lambda s: grayscale_multiframe(seed=s, frames=5, rows=128, columns=128),
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        ExplicitVRLittleEndian,
        5,
        (5, 128, 128),
    ),
    "rle": (lambda s: rle_lossless_ct(seed=s), CTImageStorage, RLELossless, 1, (512, 512)),
    "jpegls": (lambda s: jpegls_lossless_ct(seed=s), CTImageStorage, JPEGLSLossless, 1, (512, 512)),
    "j2k": (lambda s: jpeg2000_lossless_ct(seed=s), CTImageStorage, JPEG2000Lossless, 1, (512, 512)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_generator_round_trips(name: str) -> None:
    factory, sop_class, syntax, frames, shape = CASES[name]
    ds = factory(7)
    original = ds.pixel_array.copy()
    data = to_bytes(ds)
    _assert_part10(data)

    back = _read(data)
    assert back.SOPClassUID == sop_class
    assert back.file_meta.MediaStorageSOPClassUID == sop_class
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID == ds.SOPInstanceUID
    assert UID(back.SOPInstanceUID).is_valid and UID(back.StudyInstanceUID).is_valid
    assert int(back.get("NumberOfFrames", 1)) == frames
    assert back.pixel_array.shape == shape
    assert np.array_equal(back.pixel_array, original)
    # The PHI marker must be present in plaintext so ciphertext checks mean something.
    assert SYNTHETIC_MARKER in data
    assert str(back.PatientName).startswith(SYNTHETIC_MARKER.decode())
    assert back.PatientID and back.PatientBirthDate and back.PatientSex


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [
        (rle_lossless_ct, ct_image),
        (jpegls_lossless_ct, ct_image),
        (jpeg2000_lossless_ct, ct_image),
    ],
)
def test_compressed_generators_are_lossless_against_independent_original(
    compressed: Callable[..., FileDataset], plain: Callable[..., FileDataset]
) -> None:
    # Pixels depend only on the seed, so a separately built uncompressed
    # instance is an independent reference for the decoded pixels.
    decoded = _read(to_bytes(compressed(seed=11))).pixel_array
    assert np.array_equal(decoded, plain(seed=11).pixel_array)
    assert decoded.dtype == np.int16 and int(decoded.min()) < 0  # signed survived


@pytest.mark.parametrize("syntax", LOSSLESS_TRANSFER_SYNTAXES)
def test_compress_lossless_handles_rgb_multiframe(syntax: UID) -> None:
    ds = us_multiframe(seed=3, frames=2, rows=120, columns=160)
    original = ds.pixel_array.copy()
    uid = ds.SOPInstanceUID
    back = _read(to_bytes(compress_lossless(ds, syntax)))
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.SOPInstanceUID == uid  # lossless: identity kept
    assert int(back.NumberOfFrames) == 2
    assert np.array_equal(back.pixel_array, original)


def test_compress_lossless_refuses_lossy_syntax() -> None:
    with pytest.raises(ValueError, match="not one of"):
        compress_lossless(ct_image(rows=64, columns=64), JPEG2000)


def test_pixels_deterministic_per_seed_but_uids_fresh() -> None:
    a, b, c = ct_image(seed=5), ct_image(seed=5), ct_image(seed=6)
    assert np.array_equal(a.pixel_array, b.pixel_array)
    assert not np.array_equal(a.pixel_array, c.pixel_array)
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert a.PatientID == b.PatientID  # patient follows the seed


@pytest.mark.parametrize(
    ("factory", "min_ratio"),
    [(lambda: ct_image(seed=1), 0.35), (lambda: mr_image(seed=1), 0.35), (lambda: us_multiframe(frames=2), 0.15)],
)
def test_pixel_data_is_not_trivially_compressible(factory: Callable[[], FileDataset], min_ratio: float) -> None:
    raw = factory().PixelData
    # Flat or constant images would make throughput and size tests lie.
    assert len(zlib.compress(raw, 6)) / len(raw) > min_ratio


def test_shared_study_uid_groups_instances() -> None:
    study = generate_uid()
    members = [
        ct_image(study_uid=study, seed=1, rows=64, columns=64),
        mr_image(study_uid=study, seed=2, rows=64, columns=64),
        us_multiframe(study_uid=study, seed=3, frames=1, rows=48, columns=64),
    ]
    assert {m.StudyInstanceUID for m in members} == {study}
    # Study- and patient-level attributes must agree within a study.
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyDate", "StudyID"):
        assert len({str(m.get(kw)) for m in members}) == 1, kw
    assert len({m.SOPInstanceUID for m in members}) == 3
    assert len({m.SeriesInstanceUID for m in members}) == 3


def test_explicit_patient_overrides_default() -> None:
    patient = synthetic_patient(99)
    ds = mr_image(study_uid=generate_uid(), seed=1, patient=patient, rows=32, columns=32)
    assert ds.PatientID == patient.patient_id
    assert ds.PatientName == patient.name
    assert ds.PatientBirthDate == patient.birth_date.strftime("%Y%m%d")
    assert ds.PatientAge.endswith("Y") and len(ds.PatientAge) == 4


def test_default_grayscale_multiframe_is_about_32_mb() -> None:
    ds = grayscale_multiframe(seed=2)
    data = to_bytes(ds)
    assert 32 * 2**20 <= len(data) < 33 * 2**20
    back = _read(data)
    assert int(back.NumberOfFrames) == 64
    assert back.pixel_array.shape == (64, 512, 512)
    assert np.array_equal(back.pixel_array[[0, 31, 63]], ds.pixel_array[[0, 31, 63]])
    # Frames differ (a volume, not one slice repeated).
    assert not np.array_equal(back.pixel_array[0], back.pixel_array[63])


@pytest.mark.parametrize("target", [500_000, 5_000_000, 50_000_000])
def test_sized_instance_hits_target(target: int) -> None:
    start = time.monotonic()
    data = to_bytes(sized_instance(target, seed=4))
    elapsed = time.monotonic() - start
    assert abs(len(data) - target) <= 0.15 * target
    assert elapsed < 10.0
    back = _read(data)
    assert int(back.NumberOfFrames) >= 1
    assert len(back.PixelData) == int(back.NumberOfFrames) * back.Rows * back.Columns * 2


@pytest.mark.parametrize("bad", [0, 1000, 10**12])
def test_sized_instance_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="target_bytes"):
        sized_instance(bad)


# --------------------------------------------------------------------------
# Demo set
# --------------------------------------------------------------------------


def test_sample_study_set() -> None:
    samples = sample_study_set(seed=0)
    names = [n for n, _ in samples]
    assert 6 <= len(samples) <= 8
    assert len(set(names)) == len(names)
    assert all("/" not in n and n.endswith(".dcm") for n in names)
    assert sum(len(b) for _, b in samples) < 20 * 10**6

    parsed = {n: _read(b) for n, b in samples}
    for data in (b for _, b in samples):
        _assert_part10(data)
    assert len({d.SOPInstanceUID for d in parsed.values()}) == len(samples)

    by_path = {f"bundled_{p.name}": p.read_bytes() for p in bundled_files()}
    bundled = [n for n in names if n.startswith("bundled_")]
    assert set(bundled) == {"bundled_CT_small.dcm", "bundled_MR_small.dcm"}
    assert all(dict(samples)[n] == by_path[n] for n in bundled)  # byte-identical

    synthetic = {n: d for n, d in parsed.items() if n.startswith("synthetic_")}
    assert len({d.StudyInstanceUID for d in synthetic.values()}) == 2
    assert len({d.PatientID for d in synthetic.values()}) == 1
    syntaxes = {UID(d.file_meta.TransferSyntaxUID) for d in synthetic.values()}
    assert syntaxes >= {RLELossless, JPEG2000Lossless, JPEGLSLossless, ImplicitVRLittleEndian}
    assert any(int(d.get("NumberOfFrames", 1)) > 1 for d in synthetic.values())
    assert all(SYNTHETIC_MARKER in dict(samples)[n] for n in synthetic)


# --------------------------------------------------------------------------
# Malformed inputs
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def malformed() -> dict[str, bytes]:
    return malformed_samples()


def test_malformed_has_required_keys(malformed: dict[str, bytes]) -> None:
    required = {
        "not_dicom",
        "truncated",
        "missing_sop_instance_uid",
        "missing_study_instance_uid",
        "empty",
        "no_preamble_garbage",
    }
    assert required <= malformed.keys()
    assert malformed["empty"] == b""


@pytest.mark.parametrize("key", ["empty", "not_dicom", "plain_text", "no_preamble_garbage", "no_file_meta"])
def test_malformed_unparseable(malformed: dict[str, bytes], key: str) -> None:
    data = malformed[key]
    assert data[128:132] != b"DICM"
    with pytest.raises(InvalidDicomError):
        _read(data)


def test_no_preamble_garbage_fools_a_naive_sniff(malformed: dict[str, bytes]) -> None:
    assert b"DICM" in malformed["no_preamble_garbage"][:132]


def test_no_file_meta_is_only_missing_part10_framing(malformed: dict[str, bytes]) -> None:
    ds = dcmread(io.BytesIO(malformed["no_file_meta"]), force=True)
    assert ds.SOPInstanceUID and ds.StudyInstanceUID


def test_magic_then_garbage_parses_but_has_no_identity(malformed: dict[str, bytes]) -> None:
    # dcmread accepts it, so "dcmread did not raise" is not validation.
    ds = _read(malformed["magic_then_garbage"])
    assert "SOPInstanceUID" not in ds
    assert "TransferSyntaxUID" not in ds.file_meta


def test_truncated_reads_but_pixel_data_is_short(malformed: dict[str, bytes]) -> None:
    ds = _read(malformed["truncated"])  # pydicom does NOT raise here
    expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    assert 0 < len(ds.PixelData) < expected
    with pytest.raises(ValueError, match="less than expected"):
        _ = ds.pixel_array


@pytest.mark.parametrize(
    ("key", "keyword", "meta_keyword"),
    [
        ("missing_sop_instance_uid", "SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ("missing_study_instance_uid", "StudyInstanceUID", None),
    ],
)
def test_missing_uid_samples(malformed: dict[str, bytes], key: str, keyword: str, meta_keyword: str | None) -> None:
    data = malformed[key]
    _assert_part10(data)
    ds = _read(data)
    assert keyword not in ds
    if meta_keyword is not None:
        assert meta_keyword not in ds.file_meta
    # Otherwise valid, so a validator rejects it for the right reason.
    assert ds.pixel_array.shape == (128, 128)
    assert ds.SOPClassUID == CTImageStorage
    others = {"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"} - {keyword}
    assert all(kw in ds for kw in others)


def test_module_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def spy(name: str, read: bool = False, download: bool = True) -> Any:
        calls.append((name, download))
        return original_get_testdata_file(name, read=read, download=download)

    monkeypatch.setattr(ds_mod, "get_testdata_file", spy)
    bundled_files()
    bundled_transfer_syntax_variants()
    assert calls and all(download is False for _, download in calls)
