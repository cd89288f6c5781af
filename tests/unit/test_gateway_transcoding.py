"""Frames of lossless compressed instances decoded to native bytes: exactly the encoded pixels."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import RLELossless

from services.gateway.dicomweb_common import HttpError
from services.gateway.transcoding import native_frames
from tools import dicom_samples


@pytest.mark.parametrize(
    "make", [dicom_samples.rle_lossless_ct, dicom_samples.jpegls_lossless_ct, dicom_samples.jpeg2000_lossless_ct]
)
def test_lossless_ct_decodes_to_the_original_pixels(make: object) -> None:
    ds = make(seed=3)  # type: ignore[operator]
    original = ds.pixel_array
    (frame,) = native_frames(dicom_samples.to_bytes(ds), [1])
    assert frame == np.ascontiguousarray(original, dtype=original.dtype.newbyteorder("<")).tobytes()
    assert len(frame) == int(ds.Rows) * int(ds.Columns) * 2


def test_multiframe_frames_are_picked_and_missing_ones_are_404() -> None:
    ds = dicom_samples.compress_lossless(
        dicom_samples.grayscale_multiframe(seed=2, frames=4, rows=16, columns=16), RLELossless
    )
    frames = native_frames(dicom_samples.to_bytes(ds), [4, 2])
    assert frames == [ds.pixel_array[3].tobytes(), ds.pixel_array[1].tobytes()]
    with pytest.raises(HttpError) as missing:
        native_frames(dicom_samples.to_bytes(ds), [5])
    assert missing.value.status == 404


def test_ycbcr_is_served_only_as_stored() -> None:
    ds = dicom_samples.ct_image(seed=1, rows=8, columns=8)
    ds.PhotometricInterpretation = "YBR_FULL"
    with pytest.raises(HttpError) as refused:
        native_frames(dicom_samples.to_bytes(ds), [1])
    assert refused.value.status == 406
