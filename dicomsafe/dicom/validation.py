"""Deciding whether bytes are a storable DICOM instance, and extracting its identifiers.

Reasons name the rule that failed, never a value from the file: they are published to the
dead-letter topic and logged, and DICOM values may be PHI.

What other archives (Orthanc, dcm4chee) store is stored here too: only what cannot be stored
safely is refused. An inconsistency that does not stop the instance from being stored, read and
indexed by its dataset's UIDs (file meta naming another SOP Instance or Class UID, as some
RT planning systems write) is accepted as sent and recorded as a warning code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
META_INSTANCE_MISMATCH = "meta_sop_instance_uid_mismatch"
META_CLASS_MISMATCH = "meta_sop_class_uid_mismatch"
# PS3.3 C.7.6.3.1.2: uncompressed, these hold chrominance for every second pixel only.
SUBSAMPLED_422 = frozenset({"YBR_FULL_422", "YBR_PARTIAL_422"})


class InvalidInstance(ValueError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class InstanceFacts:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    # PHI: only handed to crypto to select the patient's erasure key; never logged or published.
    patient_id: str = field(default="", repr=False)
    issuer_of_patient_id: str = field(default="", repr=False)
    # Rule codes of accepted inconsistencies (never values), recorded with the stored instance.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParsedInstance:
    """An instance parsed once, every element read, for each caller that needs its attributes."""

    dataset: Dataset = field(repr=False)
    size: int
    # Offset of the first pixel data element (Float/Double/Pixel Data), or the size when there is
    # none: what a header-only read (``stop_before_pixels``) would stop at.
    header_end: int


# The elements a header-only read stops before (pydicom's stop_before_pixels).
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
# Explicit VR OB/OW/OF/OD: tag, VR, two reserved bytes, a 4-byte length. Implicit VR: tag, length.
_EXPLICIT_LONG_HEADER = 12
_IMPLICIT_HEADER = 8
_UNDEFINED_LENGTH = 0xFFFFFFFF


def validate_instance(data: bytes, max_bytes: int) -> InstanceFacts:
    return check_instance(parse_instance(data, max_bytes))


def parse_instance(data: bytes, max_bytes: int) -> ParsedInstance:
    """Parse the whole instance; InvalidInstance when it is not a readable Part 10 file."""
    if not data:
        raise InvalidInstance("empty", "payload is empty")
    if len(data) > max_bytes:
        raise InvalidInstance("oversized", f"instance is {len(data)} bytes, limit is {max_bytes}")
    # Part 10 only: without the preamble and file meta we cannot know the transfer syntax.
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InvalidInstance("not_dicom", "no DICOM Part 10 preamble (DICM) at offset 128")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        # Taken before the walk below converts the raw elements, which drops their file offsets.
        header_end = _header_end(ds, len(data))
        _read_every_item(ds)
    except Exception as exc:  # noqa: BLE001
        # Untrusted bytes: whatever the parser raises is a refusal, never a crash of the caller.
        # Listing the types let struct.error and BytesLengthException (neither a ValueError)
        # escape, until tests/unit/test_ingest_validation.py's mutations found them.
        raise InvalidInstance("unparseable", f"DICOM parse failed ({type(exc).__name__})") from None
    return ParsedInstance(ds, len(data), header_end)


# What converting a raw value would refuse, checked without converting it: the VRs pydicom
# unpacks with struct need a length that is a whole number of values.
_KNOWN_VRS = frozenset(v.value for v in VR)
_VALUE_SIZE = {"AT": 4, "FD": 8, "FL": 4, "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8}


def _raw_vr(elem: RawDataElement) -> str | None:
    if elem.VR is not None:
        return str(elem.VR)
    try:  # implicit VR: the dictionary says what it is
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return None  # an unknown private tag is read as UN


def _check_raw(elem: RawDataElement, vr: str | None) -> None:
    if vr is None or elem.length == _UNDEFINED_LENGTH:
        return
    if vr not in _KNOWN_VRS:
        raise NotImplementedError("unknown value representation")
    size = _VALUE_SIZE.get(vr)
    # The bytes read, not the declared length: a value cut short by the end of its item is shorter.
    if size and len(elem.value or b"") % size:
        raise ValueError("value length is not a whole number of values")


def _read_every_item(ds: Dataset) -> None:
    """Parse every sequence item, which dcmread leaves as raw bytes until first use, and check
    every other element's VR and length, so that malformed content is refused here rather than
    failing a viewer later.

    Only sequences are converted: converting every value (``iterall``) cost 1.35 of a 0.5 MB
    CT's 3.0 ms of validation. The raw checks refuse what that conversion refused (an unknown
    VR, a numeric value of a broken length; tests/unit/test_ingest_validation.py compares the
    two on mutated sequences); a bad text or number value converts with a warning either way.
    """
    for elem in ds.elements():
        if isinstance(elem, DataElement):
            if elem.VR == VR.SQ:
                for item in elem.value:
                    _read_every_item(item)
            continue
        if elem.VR is None and not elem.is_implicit_VR:
            # Explicit VR whose VR bytes were no VR at all: pydicom's conversion decides.
            vr = None
        else:
            vr = _raw_vr(elem)
            _check_raw(elem, vr)
        if vr in (VR.SQ, None) or (vr == VR.UN and elem.length == _UNDEFINED_LENGTH):
            converted = ds[elem.tag]
            if converted.VR == VR.SQ:
                for item in converted.value:
                    _read_every_item(item)


def check_instance(parsed: ParsedInstance) -> InstanceFacts:
    """The storability rules on a parsed instance, and its identifiers."""
    ds = parsed.dataset
    meta = ds.file_meta
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        raise InvalidInstance("missing_uid", "file meta has no TransferSyntaxUID")
    uids: dict[str, str] = {}
    for keyword in REQUIRED_UIDS:
        value = ds.get(keyword)
        if not value:
            raise InvalidInstance("missing_uid", f"{keyword} is missing")
        if not UID(str(value)).is_valid:
            raise InvalidInstance("invalid_uid", f"{keyword} is not a valid UID")
        uids[keyword] = str(value)
    # PS3.10 makes the dataset's UIDs the instance's identity; the file meta only repeats them. The
    # file is kept byte for byte (retrieval is exact) and indexed by the dataset's UIDs.
    warnings = []
    if str(meta.get("MediaStorageSOPInstanceUID", uids["SOPInstanceUID"])) != uids["SOPInstanceUID"]:
        warnings.append(META_INSTANCE_MISMATCH)
    if str(meta.get("MediaStorageSOPClassUID", uids["SOPClassUID"])) != uids["SOPClassUID"]:
        warnings.append(META_CLASS_MISMATCH)
    _check_pixel_data(ds, UID(str(ts)))
    return InstanceFacts(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(ts),
        size=parsed.size,
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or "").strip(),
        warnings=tuple(warnings),
    )


def _header_end(ds: Dataset, size: int) -> int:
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and UID(str(ts)) == DeflatedExplicitVRLittleEndian:
        # Offsets are in the inflated stream, not in the file: no byte range into the pixels.
        return size
    for tag in _PIXEL_TAGS:
        if tag in ds:
            raw = ds.get_item(tag)
            if not isinstance(raw, RawDataElement):
                return size  # not from a file read: no offset to go by
            header = _IMPLICIT_HEADER if raw.is_implicit_VR else _EXPLICIT_LONG_HEADER
            return int(raw.value_tell) - header
    return size


def _check_pixel_data(ds: Dataset, ts: UID) -> None:
    """A truncated file often still parses; the pixel data length gives it away."""
    if "PixelData" not in ds:
        return
    value = ds.PixelData
    if ts.is_compressed:
        try:
            fragments = sum(1 for _ in generate_fragments(value))
        except (ValueError, EOFError) as exc:
            raise InvalidInstance("truncated", f"encapsulated pixel data malformed ({type(exc).__name__})") from None
        if fragments == 0:
            raise InvalidInstance("truncated", "encapsulated pixel data has no fragments")
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInstance("missing_attribute", "image pixel module incomplete") from None
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() in SUBSAMPLED_422:
        samples = 2  # 4:2:2: two luminance values share one Cb and one Cr, so two values a pixel
    # Bits, not bytes: 1-bit pixels are packed across frame boundaries and rounded up at the end.
    expected = (rows * cols * samples * frames * bits + 7) // 8
    # Odd lengths are padded to even; a shorter value means the file was cut.
    if len(value) < expected:
        raise InvalidInstance("truncated", f"pixel data holds {len(value)} of {expected} bytes")
