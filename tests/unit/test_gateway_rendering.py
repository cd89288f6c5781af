"""Rendered images from real generated instances: windowing, colour, frames, sizes and refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.gateway.dicomweb_common import HttpError
from services.gateway.rendering import JPEG, PNG, RenderRequest, parse_request, render
from tools import dicom_samples


def _png(data: bytes, frame: int = 1, **kw: object) -> np.ndarray:
    out = render(data, frame, RenderRequest(media=PNG, **kw))  # type: ignore[arg-type]
    return np.asarray(Image.open(io.BytesIO(out)))


def test_ct_is_shown_through_its_own_window() -> None:
    ds = dicom_samples.ct_image(seed=1, rows=64, columns=64)
    data = dicom_samples.to_bytes(ds)
    shown = _png(data)
    assert shown.shape == (64, 64) and shown.dtype == np.uint8
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = 40 - 200, 40 + 200  # the instance's WindowCenter 40, WindowWidth 400
    assert (shown[hu <= low] == 0).all() and (shown[hu >= high] == 255).all()
    inside = (hu > low + 5) & (hu < high - 5)
    assert inside.any() and ((shown[inside] > 0) & (shown[inside] < 255)).all()


def test_a_named_window_replaces_the_stored_one() -> None:
    ds = dicom_samples.ct_image(seed=2, rows=32, columns=32)
    bone = _png(dicom_samples.to_bytes(ds), window=(1000.0, 10.0, "linear"))
    hu = ds.pixel_array.astype(float)
    assert (bone[hu < 995] == 0).all()


def test_monochrome1_is_inverted() -> None:
    ds = dicom_samples.ct_image(seed=3, rows=32, columns=32)
    normal = _png(dicom_samples.to_bytes(ds))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = _png(dicom_samples.to_bytes(ds))
    assert (inverted.astype(int) == 255 - normal.astype(int)).all()


def test_ultrasound_frames_are_rgb_and_each_its_own() -> None:
    ds = dicom_samples.us_multiframe(seed=4, frames=3, rows=24, columns=32)
    data = dicom_samples.to_bytes(ds)
    first, third = _png(data, 1), _png(data, 3)
    assert first.shape == (24, 32, 3)
    assert (first == ds.pixel_array[0]).all() and (third == ds.pixel_array[2]).all()
    with pytest.raises(HttpError) as missing:
        render(data, 4, RenderRequest())
    assert missing.value.status == 404


def test_compressed_instances_are_decoded() -> None:
    ds = dicom_samples.jpeg2000_lossless_ct(seed=5)
    out = render(dicom_samples.to_bytes(ds), 1, RenderRequest(media=JPEG, viewport=(64, 64)))
    image = Image.open(io.BytesIO(out))
    assert image.format == "JPEG" and max(image.size) == 64


def test_requests_are_parsed_or_refused() -> None:
    assert parse_request("", {}).media == JPEG
    assert parse_request("image/png", {}).media == PNG
    assert parse_request("*/*", {}, thumbnail=True).viewport == (128, 128)
    got = parse_request("image/jpeg", {"quality": "50", "viewport": "300,200", "window": "40,400,sigmoid"})
    assert (got.quality, got.viewport, got.window) == (50, (300, 200), (40.0, 400.0, "sigmoid"))
    for accept, query, status in (
        ("application/dicom", {}, 406),
        ("", {"quality": "0"}, 400),
        ("", {"viewport": "100000,10"}, 400),
        ("", {"window": "40"}, 400),
        ("", {"window": "40,-1"}, 400),
    ):
        with pytest.raises(HttpError) as refused:
            parse_request(accept, query)
        assert refused.value.status == status
