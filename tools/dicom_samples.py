"""DICOM sample data for tests, benchmarks and demos.

Three sources of input live here:

* :func:`bundled_files` - real files that ship inside the pydicom wheel. They
  were written by other toolkits, so they catch assumptions our own generator
  would share with our own parser.
* Synthetic generators (:func:`ct_image`, :func:`mr_image`,
  :func:`us_multiframe`, :func:`grayscale_multiframe`,
  :func:`compress_lossless` and friends, :func:`sized_instance`) - new
  instances with fresh UIDs, fake-but-realistic demographics and
  noisy pixel data, so size and throughput tests are not flattered by
  trivially compressible payloads.
* :func:`malformed_samples` - inputs an ingest validator must refuse.

Every synthetic PatientName contains :data:`SYNTHETIC_MARKER`, so an
encryption test can grep ciphertext or a log for it and prove that no
plaintext PHI leaked.

Nothing here touches the network: pydicom's ``get_testdata_file`` is always
called with ``download=False`` because its default would try to fetch files
that are not in the wheel.
"""

from __future__ import annotations

import datetime as _dt
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
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

__all__ = [
    "BUNDLED_FILE_NAMES",
    "LOSSLESS_TRANSFER_SYNTAXES",
    "SYNTHETIC_MARKER",
    "SyntheticPatient",
    "bundled_files",
    "bundled_transfer_syntax_variants",
    "compress_lossless",
    "ct_image",
    "grayscale_multiframe",
    "jpeg2000_lossless_ct",
    "jpegls_lossless_ct",
    "malformed_samples",
    "mr_image",
    "rle_lossless_ct",
    "sample_study_set",
    "sized_instance",
    "synthetic_patient",
    "to_bytes",
    "us_multiframe",
]

SYNTHETIC_MARKER: Final = b"DOE^SYNTHETIC"
"""Byte string present in every synthetic PatientName (as encoded on disk)."""

# Chosen so that each file has a unique SOP Instance UID: a store keyed on
# that UID would otherwise silently deduplicate them. Every entry was checked
# against pydicom 3.0.2 to have SOP Class/Instance UID, Study Instance UID,
# matching file-meta UIDs, and pixel data that decodes with the codecs in the
# ``codecs`` extra (pylibjpeg-openjpeg, pyjpegls; no libjpeg, so JPEG baseline
# files are deliberately absent).
BUNDLED_FILE_NAMES: Final[tuple[str, ...]] = (
    "CT_small.dcm",  # CT, Explicit VR LE, 128x128 int16
    "MR_small.dcm",  # MR, Explicit VR LE, 64x64 int16
    "examples_overlay.dcm",  # MR, Explicit VR LE, 484x300 uint16, has overlay
    "examples_rgb_color.dcm",  # US, Explicit VR LE, 320x240 RGB
    "examples_jpeg2k.dcm",  # US, JPEG 2000 lossless, 640x480 RGB
    "693_J2KI.dcm",  # CT, JPEG 2000 (lossy), 512x512 int16
    "SC_rgb_rle_2frame.dcm",  # SC, RLE lossless, 2 frames 100x100 RGB
)

# The same MR_small instance re-encoded by the pydicom maintainers. These all
# share one SOP Instance UID, which is why they are kept out of
# BUNDLED_FILE_NAMES; they are useful for transfer-syntax coverage.
_MR_SMALL_VARIANTS: Final[tuple[str, ...]] = (
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
)

LOSSLESS_TRANSFER_SYNTAXES: Final[tuple[UID, ...]] = (
    RLELossless,  # pydicom's own encoder, always available
    JPEGLSLossless,  # needs pyjpegls
    JPEG2000Lossless,  # needs pylibjpeg + pylibjpeg-openjpeg
)

_MANUFACTURER: Final = "dicomsafe synthetic"
_INSTITUTION: Final = "SYNTHETIC GENERAL HOSPITAL"
_MIN_SIZED_TARGET: Final = 32 * 1024
_MAX_SIZED_TARGET: Final = 512 * 1024 * 1024

Float32Array = npt.NDArray[np.float32]


def _bundled_path(name: str) -> Path:
    # download=False: the default would reach out to GitHub for files that
    # are not shipped in the wheel, and CI has no internet.
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom test file {name!r} is not bundled locally")
    return Path(found)


def bundled_files() -> list[Path]:
    """Paths of curated, valid image instances bundled with pydicom.

    Each has a distinct SOP Instance UID; includes compressed (JPEG 2000, RLE)
    and multi-frame examples. Raises FileNotFoundError if pydicom stops
    shipping one, rather than silently shrinking test coverage.
    """
    return [_bundled_path(name) for name in BUNDLED_FILE_NAMES]


def bundled_transfer_syntax_variants() -> list[Path]:
    """MR_small in six transfer syntaxes, all with the SAME SOP Instance UID.

    Explicit/implicit VR little endian, explicit big endian, RLE, JPEG 2000
    lossless and JPEG-LS lossless. Use for codec coverage, not for anything
    that assumes unique instance UIDs.
    """
    return [_bundled_path(name) for name in _MR_SMALL_VARIANTS]


# --------------------------------------------------------------------------
# Demographics
# --------------------------------------------------------------------------

_GIVEN_NAMES: Final = (
    "JANE", "JOHN", "ALEX", "MARIA", "WEI", "FATIMA", "OLUWASEUN", "SOFIA",
    "MATEO", "AIKO", "LARS", "PRIYA",
)  # fmt: skip
_STREETS: Final = ("ELM ST", "HARBOUR RD", "MAPLE AVE", "STATION LN", "HILL CRES")
_CITIES: Final = ("SPRINGFIELD", "RIVERTON", "LAKEVIEW", "FAIRHAVEN")
_PHYSICIANS: Final = ("WATSON^JOHN^^DR", "QUINN^MEREDITH^^DR", "HOUSE^GREGORY^^DR")


@dataclass(frozen=True, slots=True)
class SyntheticPatient:
    """Fake but plausible patient-level PHI (every field is identifying)."""

    name: str
    patient_id: str
    birth_date: _dt.date
    sex: str
    weight_kg: float
    height_m: float
    address: str
    phone: str


def _seeded(label: str) -> random.Random:
    # random.Random seeds a str via SHA-512, so a UID label gives the same
    # stream in every process (hash() would not: it is salted per process).
    # Not a secret, just reproducible fake data, hence the noqa.
    return random.Random(label)  # noqa: S311


def synthetic_patient(seed: int | str) -> SyntheticPatient:
    """Deterministic fake patient for `seed` (an int, or e.g. a study UID)."""
    rnd = _seeded(f"patient:{seed}")
    given = rnd.choice(_GIVEN_NAMES)
    return SyntheticPatient(
        name=f"{SYNTHETIC_MARKER.decode()}^{given}",
        patient_id=f"SYN{rnd.randrange(10**7):07d}",
        birth_date=_dt.date(1930, 1, 1) + _dt.timedelta(days=rnd.randrange(365 * 85)),
        sex=rnd.choice(("F", "M", "O")),
        weight_kg=round(rnd.uniform(45.0, 120.0), 1),
        height_m=round(rnd.uniform(1.45, 1.98), 2),
        address=f"{rnd.randrange(1, 999)} {rnd.choice(_STREETS)}, {rnd.choice(_CITIES)}",
        phone=f"+1-555-{rnd.randrange(10**4):04d}",
    )


def _age_string(born: _dt.date, on: _dt.date) -> str:
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{max(years, 0):03d}Y"


# --------------------------------------------------------------------------
# Dataset skeleton
# --------------------------------------------------------------------------


def _new_instance(
    *,
    sop_class: UID,
    transfer_syntax: UID,
    modality: str,
    description: str,
    study_uid: str | None,
    seed: int,
    patient: SyntheticPatient | None,
) -> FileDataset:
    study = study_uid if study_uid is not None else generate_uid()
    # Study-level attributes are derived from the study UID so that separate
    # calls sharing a study agree on date, accession number and (by default)
    # patient, as a real PACS would require.
    srnd = _seeded(f"study:{study}")
    if patient is None:
        patient = synthetic_patient(study if study_uid is not None else seed)
    study_dt = _dt.datetime(2023, 1, 1, 7, 0) + _dt.timedelta(days=srnd.randrange(700), minutes=srnd.randrange(11 * 60))
    series_dt = study_dt + _dt.timedelta(minutes=_seeded(f"series:{seed}").randrange(1, 45))

    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax

    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality in ("CT", "MR") else "OTHER"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_dt.strftime("%Y%m%d")
    ds.StudyTime = study_dt.strftime("%H%M%S")
    ds.SeriesTime = ds.ContentTime = series_dt.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{srnd.randrange(10**8):08d}"
    ds.Modality = modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = _INSTITUTION
    ds.ReferringPhysicianName = srnd.choice(_PHYSICIANS)
    ds.StudyDescription = f"SYNTHETIC {modality} STUDY"
    ds.SeriesDescription = description
    ds.OperatorsName = "TECH^SYNTHETIC"

    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "SYNTHETIC-MRN"
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = _age_string(patient.birth_date, study_dt.date())
    ds.PatientSize = f"{patient.height_m:.2f}"
    ds.PatientWeight = f"{patient.weight_kg:.1f}"
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.PatientComments = "SYNTHETIC TEST DATA - NOT A REAL PATIENT"

    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = f"{srnd.randrange(10**4)}"
    ds.SeriesNumber = 1 + seed % 1000
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    return ds


def _set_grayscale16(ds: Dataset, pixels: npt.NDArray[np.int16] | npt.NDArray[np.uint16], bits_stored: int) -> None:
    frames, rows, cols = (1, *pixels.shape) if pixels.ndim == 2 else pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames
    # "<" pins little endian: both Implicit and Explicit VR LE store it so,
    # and tobytes() would otherwise follow the host byte order.
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()


def _set_plane(ds: Dataset, spacing_mm: float, z_mm: float, thickness_mm: float) -> None:
    ds.PixelSpacing = [f"{spacing_mm:.4f}", f"{spacing_mm:.4f}"]
    ds.SliceThickness = f"{thickness_mm:.2f}"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    half = spacing_mm * int(ds.Columns) / 2
    ds.ImagePositionPatient = [f"{-half:.3f}", f"{-half:.3f}", f"{z_mm:.3f}"]
    ds.SliceLocation = f"{z_mm:.3f}"


# --------------------------------------------------------------------------
# Pixel content
# --------------------------------------------------------------------------


def _grid(rows: int, cols: int) -> tuple[Float32Array, Float32Array]:
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    return np.broadcast_to(y, (rows, cols)), np.broadcast_to(x, (rows, cols))


def _ct_hu(rng: np.random.Generator, rows: int, cols: int, z: float) -> Float32Array:
    """Torso-like phantom in Hounsfield units; `z` in [0, 1] shifts anatomy."""
    y, x = _grid(rows, cols)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    inside = body <= 1.0
    # A gentle gradient avoids flat regions that RLE would collapse to nothing.
    hu[inside] = 40.0 + 25.0 * y[inside] - 15.0 * x[inside]
    hu[(body > 0.88) & inside] = 350.0 + 400.0 * np.abs(x[(body > 0.88) & inside])
    lung_r = 0.18 + 0.08 * np.sin(np.pi * z)
    for cx in (-0.38, 0.38):
        hu[((x - cx) / (lung_r * 1.4)) ** 2 + ((y + 0.05) / (lung_r * 2.0)) ** 2 <= 1.0] = -850.0
    for _ in range(3):
        cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.04, 0.12)
        hu[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = rng.uniform(-100.0, 250.0)
    hu += rng.standard_normal((rows, cols), dtype=np.float32) * 12.0
    return hu


def _ct_pixels(rng: np.random.Generator, rows: int, cols: int, z: float) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(_ct_hu(rng, rows, cols, z)), -1024, 3071).astype(np.int16)


def _mr_pixels(rng: np.random.Generator, rows: int, cols: int) -> npt.NDArray[np.uint16]:
    y, x = _grid(rows, cols)
    head = (x / 0.75) ** 2 + (y / 0.9) ** 2
    sig = np.zeros((rows, cols), dtype=np.float32)
    sig[head <= 1.0] = 1400.0  # white matter
    sig[(head <= 1.0) & (head > 0.8)] = 900.0  # cortex/scalp ring
    sig[(x / 0.12) ** 2 + ((y + 0.1) / 0.3) ** 2 <= 1.0] = 2600.0  # ventricles
    sig *= 0.75 + 0.25 * (1.0 - (x * x + y * y) / 2.0)  # coil bias field
    noise = rng.standard_normal((2, rows, cols), dtype=np.float32) * 35.0
    # Magnitude of complex noise: the Rician background real MR has.
    mag: Float32Array = np.hypot(sig + noise[0], noise[1])
    return np.clip(np.rint(mag), 0, 4095).astype(np.uint16)


def _us_frames(rng: np.random.Generator, frames: int, rows: int, cols: int) -> npt.NDArray[np.uint8]:
    y, x = _grid(rows, cols)
    apex_y = -1.0
    radius = np.hypot(x, y - apex_y)
    angle = np.arctan2(x, y - apex_y)
    sector = (radius < 1.9) & (np.abs(angle) < 0.65)
    out = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for f in range(frames):
        # Rayleigh-distributed speckle is what makes real US barely compressible.
        u = rng.random((rows, cols), dtype=np.float32)
        speckle = np.sqrt(-2.0 * np.log1p(-u)) * 55.0
        tissue = speckle * (1.0 - 0.35 * radius / 1.9)
        phase = 2.0 * np.pi * f / max(frames, 1)
        vessel = (x - 0.15 * np.sin(phase)) ** 2 + (y - 0.2) ** 2 <= 0.02
        gray = np.where(sector, np.clip(tissue, 0, 255), 0).astype(np.uint8)
        out[f, ..., 0] = out[f, ..., 1] = out[f, ..., 2] = gray
        # A colour-Doppler blob so the three channels differ.
        out[f, vessel & sector, 0] = 200 + (f * 7) % 55
        out[f, vessel & sector, 1] = 20
        out[f, vessel & sector, 2] = 40
    return out


# --------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------


def ct_image(
    *,
    study_uid: str | None = None,
    seed: int = 0,
    patient: SyntheticPatient | None = None,
    rows: int = 512,
    columns: int = 512,
) -> FileDataset:
    """CT Image Storage, 16-bit signed HU, Explicit VR Little Endian.

    Pixel data is deterministic for a given seed and size; UIDs are always
    fresh. With `study_uid` given and no `patient`, the patient is derived
    from the study UID so instances of one study share demographics.
    """
    ds = _new_instance(
        sop_class=CTImageStorage,
        transfer_syntax=ExplicitVRLittleEndian,
        modality="CT",
        description="SYNTHETIC CHEST AXIAL",
        study_uid=study_uid,
        seed=seed,
        patient=patient,
    )
    rng = np.random.default_rng(seed)
    _set_grayscale16(ds, _ct_pixels(rng, rows, columns, z=(seed % 97) / 97), bits_stored=16)
    _set_plane(ds, spacing_mm=0.7, z_mm=-100.0 + seed % 200, thickness_mm=1.0)
    ds.KVP = "120"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def ct_series(
    *, study_uid: str, slices: int = 4, seed: int = 0, patient: SyntheticPatient | None = None, size: int = 128
) -> list[FileDataset]:
    """Consecutive axial CT slices of one series (one Series Instance UID, instance numbers 1..n)."""
    series = [
        ct_image(study_uid=study_uid, seed=seed + i, patient=patient, rows=size, columns=size) for i in range(slices)
    ]
    for number, slice_ in enumerate(series, start=1):
        slice_.SeriesInstanceUID = series[0].SeriesInstanceUID
        slice_.SeriesNumber = series[0].SeriesNumber
        slice_.InstanceNumber = number
    return series


def ct_with_overlay_and_icon(
    *, study_uid: str | None = None, seed: int = 0, patient: SyntheticPatient | None = None, size: int = 128
) -> FileDataset:
    """A CT slice carrying large binary values besides its pixels: a graphics overlay (60xx,3000)
    of a ring around the phantom, an 64x64 icon image (0088,0200), and a 16-byte private blob
    small enough to stay inline in DICOM JSON."""
    ds = ct_image(study_uid=study_uid, seed=seed, patient=patient, rows=size, columns=size)
    yy, xx = np.mgrid[0:size, 0:size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    ring = ((radius > size * 0.40) & (radius < size * 0.43)).astype(np.uint8)
    ds.add_new(0x60000010, "US", size)
    ds.add_new(0x60000011, "US", size)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(ring.ravel(), bitorder="little").tobytes())
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    step = max(1, size // 64)
    thumb = ds.pixel_array[::step, ::step][:64, :64].astype(np.float32)
    scaled = (thumb - thumb.min()) / max(1.0, float(thumb.max() - thumb.min())) * 255
    icon.PixelData = scaled.astype(np.uint8).tobytes()
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = [icon]
    block = ds.private_block(0x0009, "DICOMSAFE SAMPLE", create=True)
    block.add_new(0x01, "OB", bytes(range(16)))
    return ds


def mr_image(
    *,
    study_uid: str | None = None,
    seed: int = 0,
    patient: SyntheticPatient | None = None,
    rows: int = 256,
    columns: int = 256,
) -> FileDataset:
    """MR Image Storage, 16-bit unsigned (12 stored), Implicit VR Little Endian.

    Implicit VR is deliberate: it is still common from older modalities and
    exercises a parser path the CT generator does not.
    """
    ds = _new_instance(
        sop_class=MRImageStorage,
        transfer_syntax=ImplicitVRLittleEndian,
        modality="MR",
        description="SYNTHETIC T2 AXIAL",
        study_uid=study_uid,
        seed=seed,
        patient=patient,
    )
    _set_grayscale16(ds, _mr_pixels(np.random.default_rng(seed), rows, columns), bits_stored=12)
    _set_plane(ds, spacing_mm=0.9, z_mm=20.0 + seed % 50, thickness_mm=5.0)
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = "4000"
    ds.EchoTime = "90"
    ds.MagneticFieldStrength = "1.5"
    return ds


def us_multiframe(
    *,
    study_uid: str | None = None,
    seed: int = 0,
    patient: SyntheticPatient | None = None,
    frames: int = 10,
    rows: int = 480,
    columns: int = 640,
) -> FileDataset:
    """Ultrasound Multi-frame Image Storage, RGB 8-bit, Explicit VR LE.

    Size is rows*columns*3*frames bytes (default 10 frames ~ 9.2 MB).
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    ds = _new_instance(
        sop_class=UltrasoundMultiFrameImageStorage,
        transfer_syntax=ExplicitVRLittleEndian,
        modality="US",
        description="SYNTHETIC CARDIAC CINE",
        study_uid=study_uid,
        seed=seed,
        patient=patient,
    )
    pixels = _us_frames(np.random.default_rng(seed), frames, rows, columns)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameTime = "33.3"
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = pixels.tobytes()
    return ds


def grayscale_multiframe(
    *,
    study_uid: str | None = None,
    seed: int = 0,
    patient: SyntheticPatient | None = None,
    frames: int = 64,
    rows: int = 512,
    columns: int = 512,
) -> FileDataset:
    """Multi-frame Grayscale Word Secondary Capture: a CT-like volume.

    Default 64 x 512 x 512 x 16-bit ~ 32 MB, Explicit VR LE. A generic
    multi-frame SOP class is used instead of Enhanced CT because the latter
    needs per-frame functional groups that add nothing to a byte pipeline.
    Stored values are HU + 1024 (unsigned, 12 bits) with a rescale intercept.
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    ds = _new_instance(
        sop_class=MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        transfer_syntax=ExplicitVRLittleEndian,
        modality="CT",
        description="SYNTHETIC CT VOLUME (MF SC)",
        study_uid=study_uid,
        seed=seed,
        patient=patient,
    )
    rng = np.random.default_rng(seed)
    volume = np.empty((frames, rows, columns), dtype=np.uint16)
    for f in range(frames):
        hu = _ct_hu(rng, rows, columns, z=f / frames)
        volume[f] = np.clip(np.rint(hu) + 1024.0, 0, 4095).astype(np.uint16)
    _set_grayscale16(ds, volume, bits_stored=12)
    ds.ConversionType = "WSD"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelSpacing = ["0.7000", "0.7000"]
    ds.SliceThickness = "1.00"
    ds.SliceLocationVector = [f"{-100.0 + f:.1f}" for f in range(frames)]
    ds.FrameIncrementPointer = 0x00201041  # (0020,1041) Slice Location
    return ds


def compress_lossless(ds: FileDataset, transfer_syntax: UID) -> FileDataset:
    """Re-encode `ds` in place with a lossless syntax and verify it round-trips.

    The SOP Instance UID is kept: the standard only requires a new one after
    lossy compression, and keeping it lets tests match the compressed file to
    its source. Raises RuntimeError if the codec does not return identical
    pixels, which would otherwise go unnoticed until a radiologist looked.
    """
    if transfer_syntax not in LOSSLESS_TRANSFER_SYNTAXES:
        raise ValueError(f"{transfer_syntax!r} is not one of {LOSSLESS_TRANSFER_SYNTAXES}")
    original = ds.pixel_array.copy()
    ds.compress(transfer_syntax, generate_instance_uid=False)
    decoded = dcmread(io.BytesIO(to_bytes(ds))).pixel_array
    if not np.array_equal(decoded, original):
        raise RuntimeError(f"{transfer_syntax.name} round trip changed pixel data")
    return ds


def rle_lossless_ct(
    *, study_uid: str | None = None, seed: int = 0, patient: SyntheticPatient | None = None
) -> FileDataset:
    """512x512 CT, RLE Lossless (pure-Python encoder, ~0.25 s per frame)."""
    return compress_lossless(ct_image(study_uid=study_uid, seed=seed, patient=patient), RLELossless)


def jpegls_lossless_ct(
    *, study_uid: str | None = None, seed: int = 0, patient: SyntheticPatient | None = None
) -> FileDataset:
    """512x512 CT, JPEG-LS Lossless (pyjpegls)."""
    return compress_lossless(ct_image(study_uid=study_uid, seed=seed, patient=patient), JPEGLSLossless)


def jpeg2000_lossless_ct(
    *, study_uid: str | None = None, seed: int = 0, patient: SyntheticPatient | None = None
) -> FileDataset:
    """512x512 CT, JPEG 2000 Lossless (pylibjpeg-openjpeg)."""
    return compress_lossless(ct_image(study_uid=study_uid, seed=seed, patient=patient), JPEG2000Lossless)


def sized_instance(
    target_bytes: int,
    seed: int = 0,
    *,
    study_uid: str | None = None,
    patient: SyntheticPatient | None = None,
) -> FileDataset:
    """Uncompressed multi-frame instance whose Part 10 size is ~`target_bytes`.

    Intended for 0.5 MB - 50 MB. The frame size is the largest of 512/256/
    128/64 square that still gives >= 16 frames, so rounding to whole frames
    costs at most ~3 % of the target. Uncompressed on purpose: compressed
    size would depend on the codec and the noise, not on the request.
    """
    if not _MIN_SIZED_TARGET <= target_bytes <= _MAX_SIZED_TARGET:
        raise ValueError(f"target_bytes must be in [{_MIN_SIZED_TARGET}, {_MAX_SIZED_TARGET}], got {target_bytes}")
    side = next((s for s in (512, 256, 128) if target_bytes // (s * s * 2) >= 16), 64)
    frame_bytes = side * side * 2
    # Measure the real header so small targets are not skewed by it.
    probe = grayscale_multiframe(study_uid=study_uid, seed=seed, patient=patient, frames=1, rows=side, columns=side)
    header = len(to_bytes(probe)) - frame_bytes
    frames = max(1, round((target_bytes - header) / frame_bytes))
    return grayscale_multiframe(
        study_uid=probe.StudyInstanceUID,
        seed=seed,
        patient=patient,
        frames=frames,
        rows=side,
        columns=side,
    )


def to_bytes(ds: Dataset) -> bytes:
    """Encode as a DICOM Part 10 file (128-byte preamble, DICM, file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------
# Demo set and malformed inputs
# --------------------------------------------------------------------------


def sample_study_set(seed: int = 0) -> list[tuple[str, bytes]]:
    """Eight named Part 10 files (~9 MB total) for a quick end-to-end demo.

    Two bundled files kept byte-identical (so each keeps its own original
    study), plus one synthetic patient with two studies:

    * a CT study: plain, RLE and JPEG 2000 lossless slices;
    * an MR/US study: implicit-VR MR, JPEG-LS MR and an 8-frame RGB cine.
    """
    patient = synthetic_patient(seed)
    ct_study, mr_study = generate_uid(), generate_uid()
    samples: list[tuple[str, bytes]] = [
        (f"bundled_{p.name}", p.read_bytes()) for p in (_bundled_path("CT_small.dcm"), _bundled_path("MR_small.dcm"))
    ]
    ct_rle = rle_lossless_ct(study_uid=ct_study, seed=seed + 1, patient=patient)
    ct_j2k = jpeg2000_lossless_ct(study_uid=ct_study, seed=seed + 2, patient=patient)
    mr_jls = compress_lossless(mr_image(study_uid=mr_study, seed=seed + 4, patient=patient), JPEGLSLossless)
    us = us_multiframe(study_uid=mr_study, seed=seed + 5, patient=patient, frames=8)
    samples += [
        ("synthetic_ct.dcm", to_bytes(ct_image(study_uid=ct_study, seed=seed, patient=patient))),
        ("synthetic_ct_rle.dcm", to_bytes(ct_rle)),
        ("synthetic_ct_j2k.dcm", to_bytes(ct_j2k)),
        ("synthetic_mr.dcm", to_bytes(mr_image(study_uid=mr_study, seed=seed + 3, patient=patient))),
        ("synthetic_mr_jpegls.dcm", to_bytes(mr_jls)),
        ("synthetic_us_cine.dcm", to_bytes(us)),
    ]
    return samples


def _truncate_in_pixel_data(data: bytes, pixel_bytes: int) -> bytes:
    # Pixel data is the last element, so cutting half its length from the end
    # lands in the middle of it without parsing the file.
    return data[: len(data) - pixel_bytes // 2]


def _drop(ds: FileDataset, keywords: Sequence[str]) -> bytes:
    for kw in keywords:
        if kw in ds:
            delattr(ds, kw)
        if kw in ds.file_meta:
            delattr(ds.file_meta, kw)
    buf = io.BytesIO()
    # enforce_file_format=True would refuse (or back-fill) the missing UID;
    # False writes exactly what we built, preamble and all.
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _small_ct(seed: int) -> FileDataset:
    # 128x128 keeps the malformed set tiny; size is irrelevant to what is wrong.
    return ct_image(seed=seed, rows=128, columns=128)


def malformed_samples(seed: int = 0) -> dict[str, bytes]:
    """Inputs an ingest validator must reject, keyed by what is wrong.

    * ``empty`` - zero bytes.
    * ``not_dicom`` - seeded random bytes; no DICM magic at offset 128, so
      ``dcmread`` raises InvalidDicomError.
    * ``plain_text`` - ASCII text; same failure, but catches code that
      decodes input as text before sniffing it.
    * ``no_preamble_garbage`` - b"DICM" at offset 0 followed by garbage: a
      sloppy ``b"DICM" in data[:132]`` sniff accepts it; ``dcmread`` raises.
    * ``magic_then_garbage`` - a correct preamble + b"DICM" followed by
      garbage. ``dcmread`` does NOT raise (it yields a nonsense element and
      no file meta), so a validator must also demand the UIDs and syntax.
    * ``no_file_meta`` - a well-formed dataset with no preamble/DICM/file
      meta (pre-Part-10 style); ``dcmread`` raises without ``force=True``.
    * ``truncated`` - a valid CT cut in the middle of its pixel data.
      ``dcmread`` does NOT raise; PixelData is shorter than
      Rows*Columns*2 and ``pixel_array`` raises ValueError.
    * ``missing_sop_instance_uid`` - SOP Instance UID absent from both the
      dataset and the file meta (MediaStorageSOPInstanceUID), so it cannot
      be recovered from either place.
    * ``missing_study_instance_uid`` - Study Instance UID absent.
    """
    rng = np.random.default_rng(seed)
    garbage = rng.bytes(4096)

    valid = _small_ct(seed)
    valid_bytes = to_bytes(valid)
    truncated = _truncate_in_pixel_data(valid_bytes, len(valid.PixelData))

    no_meta = _small_ct(seed)
    no_meta.preamble = None
    no_meta.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    no_meta.save_as(buf, enforce_file_format=False, implicit_vr=False, little_endian=True)

    return {
        "empty": b"",
        "not_dicom": garbage,
        "plain_text": b"This is a radiology report, not a DICOM file.\n" * 40,
        "no_preamble_garbage": b"DICM" + garbage,
        "magic_then_garbage": b"\x00" * 128 + b"DICM" + garbage,
        "no_file_meta": buf.getvalue(),
        "truncated": truncated,
        "missing_sop_instance_uid": _drop(_small_ct(seed), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")),
        "missing_study_instance_uid": _drop(_small_ct(seed), ("StudyInstanceUID",)),
    }
