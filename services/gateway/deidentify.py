"""De-identified release for the researcher role: PS3.15 Annex E Basic Application Confidentiality Profile.

The attribute actions come from the Annex E table as shipped by the maintained `dicom-anonymizer`
package (its 2026c database) and its value dummies; the walk is ours, applying the table to every
item of every sequence as at the top level (the package's own walk stops at the top). UIDs are
replaced deterministically with a keyed hash (HMAC with a gateway secret), not the package's
process-local random map: the same study keeps the same pseudonymous UIDs across requests and
restarts, so a researcher can reassemble series, and nobody without the key can map them back.

QIDO-RS results for de-identified callers go through the same treatment (`query_result`), so the
UIDs a researcher finds are the UIDs of the instances they then retrieve. Matching is allowed only
on attributes the profile keeps (and on the pseudonymous UIDs): matching on one it removes or
replaces would reveal its value by bisection (PatientBirthDate ranges, PatientName wildcards).
"""

from __future__ import annotations

import hashlib
import hmac
import io
from typing import Any

import pydicom
from dicomanonymizer import simpledicomanonymizer
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e
from dicomanonymizer.simpledicomanonymizer import initialize_actions
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

ANNEX_E_VERSION = "dicomfields_2026c"
# PS3.15 E.1-1: "Patient Identity Removed" (0012,0062) YES and the method code for the basic profile.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# Every attribute the profile acts on (removes, empties, replaces) and the UIDs it maps.
_TREATED = frozenset(annex_e.ALL_TAGS)
_MAPPED_UIDS = frozenset(annex_e.U_TAGS)
KEPT, PSEUDONYMOUS, WITHHELD = "kept", "pseudonymous", "withheld"


def matching_treatment(keyword: str) -> str:
    """How a de-identified query may match on an attribute: as is, by pseudonymous UID, or not at all."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return WITHHELD  # not a standard attribute: nothing to say it is harmless
    pair = (tag >> 16, tag & 0xFFFF)
    if pair in _MAPPED_UIDS:
        return PSEUDONYMOUS
    return WITHHELD if pair in _TREATED else KEPT


# The package's action functions, by what they do to an attribute: remove it (X), empty it (Z),
# replace it with a dummy (D), map its UIDs (U). The package resolves X/Z and X/D choices to Z and
# D; we follow it. An action we do not know fails loudly at start, so a package update cannot
# silently change what is released.
_KIND_OF_ACTION: dict[str, str] = {
    "delete": "X",
    "empty": "Z",
    "delete_or_empty": "Z",
    "replace": "D",
    "empty_or_replace": "D",
    "delete_or_replace": "D",
    "delete_or_empty_or_replace": "D",
    "replace_UID": "U",
    "delete_or_empty_or_replace_UID": "U",
    "keep": "K",
}
# (group, element, group mask, element mask): the profile's repeating groups (curves, overlays).
RepeatingRule = tuple[int, int, int, int]


def _profile_actions() -> tuple[dict[tuple[int, int], str], list[tuple[RepeatingRule, str]]]:
    single: dict[tuple[int, int], str] = {}
    repeating: list[tuple[RepeatingRule, str]] = []
    for tag, action in initialize_actions(ANNEX_E_VERSION).items():
        kind = _KIND_OF_ACTION.get(getattr(action, "__name__", ""))
        if kind is None:
            raise RuntimeError(f"unknown Annex E action {action!r} for {tag}")
        if len(tag) == 4:
            repeating.append((tag, kind))
        else:
            single[(tag[0], tag[1])] = kind
    # X/Z/U* sequences are kept and their references mapped (the items go through the profile
    # themselves), so a researcher can still follow a series' references to its sources.
    for tag in annex_e.X_Z_U_STAR_TAGS:
        single[(tag[0], tag[1])] = "U"
    return single, repeating


class Deidentifier:
    """The Annex E profile applied at every nesting depth: a sequence the profile keeps (say
    ContributingEquipmentSequence) still has its items' dates, names and UIDs treated, the same
    way as at the top level, because the package applies its rules to the top level only."""

    def __init__(self, uid_key: bytes) -> None:
        if len(uid_key) < 16:
            raise ValueError("the de-identification UID key must be at least 16 bytes")
        self._key = uid_key
        self._single, self._repeating = _profile_actions()

    @property
    def key_id(self) -> str:
        """Names the UID key without revealing it: stored pseudonyms made with another key are stale."""
        return hmac.new(self._key, b"dicomsafe pseudonymous UID key id", hashlib.sha256).hexdigest()[:16]

    def pseudonymous_uid(self, uid: str) -> str:
        """A valid UID under the 2.25 root (ITU-T X.667), derived from the original with the key."""
        digest = hmac.new(self._key, uid.encode("ascii", "replace"), hashlib.sha256).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify in place (and return) a dataset, file meta included."""
        self._treat(ds)
        if hasattr(ds, "file_meta"):
            self._treat(ds.file_meta)
        if "SOPInstanceUID" in ds and hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        method = Dataset()
        method.CodeValue, method.CodingSchemeDesignator, method.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = [method]
        return ds

    def _kind(self, group: int, element: int) -> str:
        kind = self._single.get((group, element))
        if kind is not None:
            return kind
        for (g, e, g_mask, e_mask), repeating_kind in self._repeating:
            if group & g_mask == g & g_mask and element & e_mask == e & e_mask:
                return repeating_kind
        return "K"

    def _treat(self, level: Dataset) -> None:
        """One dataset level of the profile, then every item of every sequence it keeps."""
        for tag in list(level.keys()):
            if tag.is_private:
                del level[tag]  # Annex E: private attributes removed, at every level
                continue
            element = level[tag]
            kind = self._kind(tag.group, tag.element)
            if kind == "X":
                del level[tag]
            elif element.VR == "SQ":
                if kind == "Z":
                    element.value = []
                elif kind == "D":
                    for item in element.value:
                        self._dummy(item)
                else:  # kept (K) or kept with mapped references (U): the items get the profile too
                    for item in element.value:
                        self._treat(item)
            elif kind == "Z":
                simpledicomanonymizer.empty_element(element)
            elif kind == "U" or (kind == "D" and element.VR == "UI"):
                if element.VR == "UI":
                    if element.value:
                        element.value = self._mapped(element.value)
                else:
                    simpledicomanonymizer.empty_element(element)
            elif kind == "D":
                self._replace(level, element)

    def _dummy(self, level: Dataset) -> None:
        """A D-sequence's items: every value a dummy, UIDs of instances mapped, class UIDs kept."""
        for tag in list(level.keys()):
            element = level[tag]
            if tag.is_private:
                del level[tag]
            elif element.VR == "SQ":
                for item in element.value:
                    self._dummy(item)
            elif element.VR == "UI":
                if self._kind(tag.group, tag.element) == "U" and element.value:
                    element.value = self._mapped(element.value)
            else:
                self._replace(level, element)

    @staticmethod
    def _replace(level: Dataset, element: DataElement) -> None:
        try:
            simpledicomanonymizer.replace_element(element)
        except NotImplementedError:
            # A VR with no dummy in the package (OW, OF, AT, ...): removed rather than released.
            del level[element.tag]

    def query_result(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A QIDO-RS result (DICOM JSON) through the same profile as a released instance."""
        ds = Dataset.from_json(attrs)
        self.dataset(ds)
        out: dict[str, Any] = ds.to_json_dict()
        return out

    def instance(self, data: bytes) -> bytes:
        """De-identify a Part 10 instance; the transfer syntax (and so the pixel data) is unchanged."""
        ds = pydicom.dcmread(io.BytesIO(data))
        self.dataset(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def _mapped(self, value: Any) -> Any:
        if isinstance(value, MultiValue | list):
            return [self.pseudonymous_uid(str(v)) for v in value]
        return self.pseudonymous_uid(str(value))
