"""Large binary values of the header by reference: where metadata points is what the route serves."""

from __future__ import annotations

import io

import pydicom
import pytest

from services.gateway.bulk_data import PYDICOM_THRESHOLD, parse_path, uri_handler, value_at
from services.gateway.dicomweb_common import HttpError
from tools import dicom_samples

pytestmark = pytest.mark.unit
BASE = "https://pacs.example/dicom-web/studies/1/series/2/instances/3"


def _header() -> pydicom.Dataset:
    data = dicom_samples.to_bytes(dicom_samples.ct_with_overlay_and_icon(seed=4))
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def test_large_values_become_uris_that_resolve_to_their_bytes() -> None:
    ds = _header()
    attrs = ds.to_json_dict(bulk_data_threshold=PYDICOM_THRESHOLD, bulk_data_element_handler=uri_handler(ds, BASE))
    overlay_uri = attrs["60003000"]["BulkDataURI"]
    icon_uri = attrs["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert overlay_uri == f"{BASE}/bulkdata/60003000"
    assert icon_uri == f"{BASE}/bulkdata/00880200/0/7FE00010"
    assert value_at(ds, parse_path(overlay_uri.split("/bulkdata/")[1])) == ds[0x60003000].value
    icon_path = parse_path(icon_uri.split("/bulkdata/")[1])
    assert value_at(ds, icon_path) == ds.IconImageSequence[0].PixelData
    assert len(value_at(ds, icon_path)) == 64 * 64
    # The 16-byte private value stays inline, base64 as DICOM JSON has it.
    private = next(v for k, v in attrs.items() if k.startswith("0009") and v["vr"] == "OB")
    assert "InlineBinary" in private and "BulkDataURI" not in private


def test_the_threshold_is_one_kibibyte_of_value() -> None:
    ds = pydicom.Dataset()
    ds.add_new(0x00091001, "OB", bytes(1023))
    ds.add_new(0x00091002, "OB", bytes(1024))
    attrs = ds.to_json_dict(bulk_data_threshold=PYDICOM_THRESHOLD, bulk_data_element_handler=uri_handler(ds, BASE))
    assert "InlineBinary" in attrs["00091001"]
    assert attrs["00091002"]["BulkDataURI"] == f"{BASE}/bulkdata/00091002"


@pytest.mark.parametrize(
    "path", ["", "6000300", "60003000/0", "6000300G", "00880200/x/7FE00010", "00880200/-1/7FE00010"]
)
def test_malformed_paths_are_400(path: str) -> None:
    with pytest.raises(HttpError) as refused:
        parse_path(path)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    "path",
    [
        "60023000",  # absent
        "00100010",  # present, not binary (PatientName)
        "00880200/1/7FE00010",  # no such item
        "00100010/0/7FE00010",  # not a sequence
        "00880200/0/60003000",  # absent inside the item
    ],
)
def test_paths_naming_no_binary_value_are_404(path: str) -> None:
    with pytest.raises(HttpError) as missing:
        value_at(_header(), parse_path(path))
    assert missing.value.status == 404
    # The refusal says what is wrong, never a value of the instance.
    assert missing.value.comment == "no such bulk data in this instance"
