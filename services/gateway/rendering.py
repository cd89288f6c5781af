"""Rendered and thumbnail images (PS3.18 8.3.5, 9.5): one frame of a stored instance as a consumer
image (JPEG or PNG), for browsers, reports and study lists that cannot decode DICOM.

Greyscale frames go through the instance's Modality LUT and its VOI window (or the one asked for
with ``window=center,width[,linear|sigmoid]``), else the frame's own range; colour frames are
converted to RGB. Only the stored pixels are used: no overlay, presentation state or text is drawn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, convert_color_space

from services.gateway.dicomweb_common import HttpError
from services.gateway.multipart import MediaType
from services.gateway.transcoding import decoded_frames

JPEG, PNG = "image/jpeg", "image/png"
# A thumbnail's box when the caller names no viewport (PS3.18 leaves it to the origin server).
THUMBNAIL_BOX = (128, 128)
# Rendered images are for display: a request for more pixels than this is refused, not computed.
MAX_VIEWPORT = 4096
DEFAULT_QUALITY = 90


@dataclass(frozen=True)
class RenderRequest:
    media: str = JPEG
    quality: int = DEFAULT_QUALITY
    viewport: tuple[int, int] | None = None
    window: tuple[float, float, str] | None = None


def parse_request(accept: str, query: dict[str, str], thumbnail: bool = False) -> RenderRequest:
    """Accept and the query parameters of a rendered or thumbnail request, or HttpError 400/406."""
    media = _accepted_media(accept)
    quality = DEFAULT_QUALITY
    if "quality" in query:
        try:
            quality = int(query["quality"])
        except ValueError:
            raise HttpError(400, "quality must be an integer 1-100") from None
        if not 1 <= quality <= 100:
            raise HttpError(400, "quality must be an integer 1-100")
    viewport = THUMBNAIL_BOX if thumbnail else None
    if "viewport" in query:
        try:
            width, height = (int(v) for v in query["viewport"].split(","))
        except ValueError:
            raise HttpError(400, "viewport must be width,height") from None
        if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
            raise HttpError(400, f"viewport sides are 1-{MAX_VIEWPORT} pixels")
        viewport = (width, height)
    window = None
    if "window" in query:
        parts = query["window"].split(",")
        try:
            center, width_ = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise HttpError(400, "window must be center,width[,function]") from None
        function = parts[2].strip().lower() if len(parts) > 2 else "linear"
        if function not in ("linear", "sigmoid") or width_ <= 0:
            raise HttpError(400, "window width must be positive, function linear or sigmoid")
        window = (center, width_, function)
    return RenderRequest(media, quality, viewport, window)


def _accepted_media(accept: str) -> str:
    if not accept.strip():
        return JPEG
    for entry in accept.split(","):
        kind = MediaType.parse(entry).type
        if kind in (JPEG, PNG):
            return kind
        if kind in ("*/*", "image/*"):
            return JPEG
    raise HttpError(406, "rendered images are image/jpeg or image/png")


def render(data: bytes, frame: int, request: RenderRequest) -> bytes:
    """Frame ``frame`` (1-based) of a Part 10 instance as the requested image.

    HttpError 404 for a frame the instance lacks, 406 for pixels this server cannot decode."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" not in ds:
        raise HttpError(404, "instance has no pixel data to render")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= frames:
        raise HttpError(404, "no such frame")
    pixels = decoded_frames(ds, "cannot render this instance's transfer syntax here")[frame - 1]
    image = Image.fromarray(_display_pixels(ds, pixels, request.window))
    if request.viewport is not None:
        image.thumbnail(request.viewport, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if request.media == PNG:
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=request.quality)
    return out.getvalue()


def _display_pixels(
    ds: pydicom.Dataset, pixels: npt.NDArray[np.generic], window: tuple[float, float, str] | None
) -> npt.NDArray[np.uint8]:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        if photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        # Colour is shown as stored: scaled only from its bit depth, never stretched to its range.
        return _to_uint8(pixels.astype(np.float64), 0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    window = window or _stored_window(ds)
    if window is not None:
        shown = _windowed(values, *window)
    else:
        shown = _to_uint8(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        shown = 255 - shown
    return shown.astype(np.uint8)


def _stored_window(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """The instance's first VOI window (Window Center/Width, in modality units), if it has one."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    centers, widths = ds["WindowCenter"].value, ds["WindowWidth"].value
    center = float(centers[0] if ds["WindowCenter"].VM > 1 else centers)
    width = float(widths[0] if ds["WindowWidth"].VM > 1 else widths)
    function = str(ds.get("VOILUTFunction", "LINEAR")).lower()
    return (center, width, "sigmoid" if function == "sigmoid" else "linear") if width > 0 else None


def _windowed(values: npt.NDArray[np.float64], center: float, width: float, function: str) -> npt.NDArray[np.uint8]:
    if function == "sigmoid":
        return (255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.uint8)
    return _to_uint8(values, center - width / 2, center + width / 2)


def _to_uint8(values: npt.NDArray[np.float64], low: float, high: float) -> npt.NDArray[np.uint8]:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    return scaled.round().astype(np.uint8)
