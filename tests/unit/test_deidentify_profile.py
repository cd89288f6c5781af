"""PS3.15 Annex E applied at every depth: a dataset holding every attribute of the profile's table,
at the top level and again two sequences deep, comes out with each of them treated at both depths."""

from __future__ import annotations

import io
from typing import Any

import pydicom
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from services.gateway.deidentify import Deidentifier
from tools import dicom_samples

SECRET = "SECRET"
UID_ROOT = "1.2.826.0.1.3680043.10."
# Kept sequences (not in the table) that carry the nested copies: the leak the issue reported was
# ContributionDateTime inside ContributingEquipmentSequence.
OUTER, INNER = "ContributingEquipmentSequence", "ReferencedSeriesSequence"
# VRs the test does not generate values for. The only table entries with them are the retired
# tags pydicom's dictionary does not know (VR "?"); the count below pins them.
UNGENERATED = frozenset({"?", "OF", "OD", "OL", "OV", "SV", "UV", "AT"})
MAX_UNGENERATED = 30


def _kinds() -> dict[tuple[int, int], str]:
    kinds: dict[tuple[int, int], str] = {}
    for name, kind in (
        ("X_TAGS", "X"),
        ("Z_TAGS", "Z"),
        ("X_Z_TAGS", "Z"),
        ("D_TAGS", "D"),
        ("Z_D_TAGS", "D"),
        ("X_D_TAGS", "D"),
        ("X_Z_D_TAGS", "D"),
        ("U_TAGS", "U"),
        ("X_Z_U_STAR_TAGS", "U"),
    ):
        for tag in getattr(annex_e, name):
            # Command (0000) and file meta (0002) elements cannot be in a stored dataset; the file
            # meta's UID is covered through Deidentifier.instance below.
            if len(tag) == 2 and tag[0] not in (0x0000, 0x0002):
                kinds[(tag[0], tag[1])] = kind
    return kinds


KINDS = _kinds()


def _vr(tag: tuple[int, int]) -> str:
    try:
        return str(dictionary_VR((tag[0] << 16) | tag[1]))
    except KeyError:
        return "?"


def _value(vr: str, n: int) -> Any:
    """A value valid for ``vr``, unique to ``n``, recognisable wherever it ends up."""
    if vr in ("LO", "LT", "SH", "ST", "UC", "UT"):
        return f"{SECRET}{n:05d}"
    if vr == "PN":
        return f"{SECRET}{n:05d}^Person"
    if vr == "AE":
        return f"{SECRET}{n:05d}"
    if vr == "CS":
        return f"{SECRET}{n:05d}"
    if vr == "UR":
        return f"http://{SECRET.lower()}{n}.example"
    if vr == "UI":
        return f"{UID_ROOT}{n}"
    if vr == "DA":
        return f"19{n % 100:02d}{1 + n % 12:02d}{1 + n % 28:02d}"
    if vr == "TM":
        return f"{n % 24:02d}{n % 60:02d}{(n * 7) % 60:02d}"
    if vr == "DT":
        return f"19{n % 100:02d}{1 + n % 12:02d}{1 + n % 28:02d}{n % 24:02d}{n % 60:02d}00"
    if vr == "AS":
        return f"{n % 1000:03d}Y"
    if vr == "DS":
        return f"{7000 + n}.5"
    if vr == "IS":
        return str(70000 + n)
    if vr in ("US", "SS"):
        return 3000 + n
    if vr in ("UL", "SL"):
        return 700000 + n
    if vr in ("FL", "FD"):
        return float(n) + 0.25
    if vr in ("OB", "OW", "UN"):
        return f"{SECRET}{n:05d}".encode("ascii")
    raise AssertionError(vr)


def _sequence_item(n: int, kind: str) -> Dataset:
    item = Dataset()
    # A U sequence is kept and its items go through the profile, which keeps a code value; in an
    # X, Z or D sequence every value is gone or a dummy.
    item.CodeValue = "KEPTCODE" if kind == "U" else f"{SECRET}{n:05d}"
    item.ReferencedSOPInstanceUID = f"{UID_ROOT}{n}"
    item.ReferencedSOPClassUID = pydicom.uid.CTImageStorage  # a class, not an instance: kept
    return item


def _fill(ds: Dataset, offset: int) -> tuple[dict[tuple[int, int], Any], int]:
    """Every table attribute into ``ds``; returns the originals and how many VRs were skipped."""
    originals: dict[tuple[int, int], Any] = {}
    skipped = 0
    for n, tag in enumerate(sorted(KINDS), start=offset):
        vr = _vr(tag)
        if vr in UNGENERATED or " or " in vr:
            skipped += 1
            continue
        value: Any = Sequence([_sequence_item(n, KINDS[tag])]) if vr == "SQ" else _value(vr, n)
        ds.add_new(Tag(tag), vr, value)
        originals[tag] = value
    return originals, skipped


def _build() -> tuple[Dataset, dict[str, dict[tuple[int, int], Any]], int]:
    ds = dicom_samples.ct_image(study_uid=pydicom.uid.generate_uid(), seed=1, rows=8, columns=8)
    for tag in KINDS:  # the sample's own values of table attributes give way to the test's
        if Tag(tag) in ds:
            del ds[Tag(tag)]
    top, skipped = _fill(ds, 0)
    inner = Dataset()
    nested, _ = _fill(inner, 10_000)
    outer = Dataset()
    outer.Manufacturer = "KEPT-MAKER"  # not in the table: a kept sequence keeps what is harmless
    outer.add_new(Tag(keyword_for_tag_or_fail(INNER)), "SQ", Sequence([inner]))
    setattr(ds, OUTER, Sequence([outer]))
    return ds, {"top": top, "nested": nested}, skipped


def keyword_for_tag_or_fail(keyword: str) -> int:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert tag is not None and keyword_for_tag(tag) == keyword
    assert (tag >> 16, tag & 0xFFFF) not in KINDS, f"{keyword} must be a kept sequence for this test"
    return tag


def _levels(ds: Dataset) -> dict[str, Dataset]:
    outer = getattr(ds, OUTER)[0]
    return {"top": ds, "nested": getattr(outer, INNER)[0]}


@pytest.fixture(scope="module")
def released() -> tuple[Deidentifier, Dataset, Dataset, dict[str, dict[tuple[int, int], Any]], int]:
    deid = Deidentifier(b"k" * 32)
    original, originals, skipped = _build()
    out = deid.dataset(pydicom.dcmread(io.BytesIO(dicom_samples.to_bytes(original))))
    return deid, original, out, originals, skipped


def test_every_table_attribute_is_present_at_both_depths(released: Any) -> None:
    _, _, _, originals, skipped = released
    assert skipped <= MAX_UNGENERATED
    assert len(originals["top"]) == len(originals["nested"]) >= len(KINDS) - MAX_UNGENERATED


@pytest.mark.parametrize("depth", ["top", "nested"])
def test_each_action_is_applied_at_every_depth(released: Any, depth: str) -> None:
    deid, _, out, originals, _ = released
    level = _levels(out)[depth]
    wrong: list[str] = []
    for tag, original in originals[depth].items():
        kind, name = KINDS[tag], keyword_for_tag((tag[0] << 16) | tag[1]) or str(tag)
        element = level.get(Tag(tag))
        if kind == "X":
            if element is not None:
                wrong.append(f"{name}: not removed")
            continue
        if element is None:
            continue  # removing is always allowed where a dummy or empty value would be
        if element.VR == "SQ":
            items = list(element.value)
            if kind == "Z" and items:
                wrong.append(f"{name}: sequence not emptied")
            for item in items:
                if kind != "U" and item.get("CodeValue") == original[0].CodeValue:
                    wrong.append(f"{name}: item value kept")
                ref = item.get("ReferencedSOPInstanceUID")
                if ref is not None and ref != deid.pseudonymous_uid(original[0].ReferencedSOPInstanceUID):
                    wrong.append(f"{name}: nested reference not mapped to its pseudonym")
            continue
        if kind == "U":
            if element.value != deid.pseudonymous_uid(original):
                wrong.append(f"{name}: UID not mapped to its pseudonym")
        elif element.value == original and element.value not in ("", b"", None):
            wrong.append(f"{name}: {kind} not applied")
    assert not wrong, wrong


def test_no_original_value_survives_anywhere(released: Any) -> None:
    _, _, out, _, _ = released
    body = io.BytesIO()
    out.save_as(body, enforce_file_format=True)
    raw = body.getvalue()
    assert SECRET.encode() not in raw
    assert SECRET.lower().encode() not in raw
    assert UID_ROOT.encode() not in raw
    assert SECRET not in str(out.to_json_dict())


def test_kept_attributes_stay_and_references_stay_consistent(released: Any) -> None:
    deid, original, out, originals, _ = released
    assert getattr(out, OUTER)[0].Manufacturer == "KEPT-MAKER"
    inner = _levels(out)["nested"]
    assert inner.SeriesInstanceUID == deid.pseudonymous_uid(originals["nested"][(0x0020, 0x000E)])
    referenced = next(item for item in out.ReferencedImageSequence)
    assert referenced.ReferencedSOPClassUID == pydicom.uid.CTImageStorage
    # The same original UID gets the same pseudonym at every depth.
    source = original.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert referenced.ReferencedSOPInstanceUID == deid.pseudonymous_uid(source)
    assert out.PatientIdentityRemoved == "YES"


def test_released_instance_has_no_nested_contribution_date() -> None:
    """The reported leak, through the Part 10 path WADO-RS and WADO-URI use."""
    ds = dicom_samples.ct_image(study_uid=pydicom.uid.generate_uid(), seed=2, rows=8, columns=8)
    equipment = Dataset()
    equipment.Manufacturer = "Acme"
    equipment.ContributionDateTime = "20240102030405"
    equipment.ContributionDescription = "sent by Dr Smith"
    equipment.StationName = "CT-WARD-7"
    ds.ContributingEquipmentSequence = [equipment]
    deid = Deidentifier(b"k" * 32)
    out = pydicom.dcmread(io.BytesIO(deid.instance(dicom_samples.to_bytes(ds))))
    item = out.ContributingEquipmentSequence[0]
    assert "ContributionDateTime" not in item or item.ContributionDateTime != "20240102030405"
    assert "ContributionDescription" not in item or "Smith" not in str(item.ContributionDescription)
    assert "StationName" not in item or item.StationName != "CT-WARD-7"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == deid.pseudonymous_uid(ds.SOPInstanceUID)
    assert out.PixelData == ds.PixelData
