"""Frames decoded to Explicit VR Little Endian for clients that cannot decode what is stored
(PS3.18 8.7.3: the Accept transfer-syntax parameter names what the client can read).

Only lossless compressed syntaxes whose colour space survives decoding are offered: decoding them
gives back exactly the pixels that were encoded, so the client sees what the modality produced.
Lossy ones (and YCbCr data, which decoders convert) answer 406 instead of pixels that differ from
the stored ones in a way the client could not tell.
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pydicom

from services.gateway.dicomweb_common import HttpError

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DECODED_TO_NATIVE = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    }
)
_UNCHANGED_COLOUR = frozenset({"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"})


def native_frames(data: bytes, numbers: list[int]) -> list[bytes]:
    """Frames ``numbers`` (1-based) of a Part 10 instance as native little-endian pixel bytes."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if int(ds.get("BitsAllocated", 8)) == 1:
        raise HttpError(406, "bit-packed frames are served only as stored")
    if str(ds.get("PhotometricInterpretation", "")) not in _UNCHANGED_COLOUR:
        raise HttpError(406, "frames of this colour space are served only as stored")
    frames = decoded_frames(ds, "cannot decode this instance's transfer syntax here")
    if max(numbers) > len(frames):
        raise HttpError(404, "no such frame")
    little = frames.dtype.newbyteorder("<")
    return [np.ascontiguousarray(frames[n - 1], dtype=little).tobytes() for n in numbers]


def decoded_frames(ds: pydicom.Dataset, refusal: str) -> npt.NDArray[np.generic]:
    """Every frame of ``ds`` decoded, frame first even for a single frame; HttpError 406 with
    ``refusal`` when no installed decoder reads its pixel data."""
    try:
        pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - any decoder failure: the codec is missing or refuses the data
        raise HttpError(406, refusal) from None
    return pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[np.newaxis, ...]
