"""Where things are inside a stored Part 10 instance: header end, pixel data, each frame's bytes.

WADO-RS serves metadata, frames and bulk data by opening byte ranges of the sealed object
(crypto decrypts only the chunks a range touches), so a frame of a large cine is read without
decrypting the rest. The layout is computed once, when the instance is indexed.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

PIXEL_DATA_TAG = (0x7FE0, 0x0010)
ITEM = (0xFFFE, 0xE000)
SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
UNDEFINED_LENGTH = 0xFFFFFFFF

# A byte range of the instance: (offset, length).
Span = tuple[int, int]


class LayoutError(ValueError):
    """The instance's pixel data cannot be located; the message names the rule, never a value."""


@dataclass(frozen=True)
class InstanceLayout:
    # Bytes before the pixel data element: enough to parse every attribute but the pixels.
    header_length: int
    # The pixel data value (for encapsulated data: the whole item sequence).
    pixel_data: Span | None
    # Per frame, the fragments that make it up (native data: one span per frame).
    frames: tuple[tuple[Span, ...], ...]
    encapsulated: bool

    def as_document(self) -> dict[str, object]:
        return {
            "header_length": self.header_length,
            "pixel_data": list(self.pixel_data) if self.pixel_data else None,
            "frames": [[list(span) for span in frame] for frame in self.frames],
            "encapsulated": self.encapsulated,
        }

    @classmethod
    def from_document(cls, doc: dict[str, object]) -> InstanceLayout:
        pixel = doc.get("pixel_data")
        frames = doc.get("frames") or []
        assert isinstance(frames, list)
        return cls(
            header_length=int(str(doc["header_length"])),
            pixel_data=(int(pixel[0]), int(pixel[1])) if isinstance(pixel, list) else None,
            frames=tuple(tuple((int(s[0]), int(s[1])) for s in frame) for frame in frames),
            encapsulated=bool(doc.get("encapsulated")),
        )


def read_header(data: bytes) -> tuple[Dataset, int]:
    """The dataset without pixel data, and the offset where the pixel data element starts."""
    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    return ds, fp.tell()


def layout_of(data: bytes) -> tuple[Dataset, InstanceLayout]:
    ds, header_end = read_header(data)
    return ds, layout_from(data, ds, header_end)


def layout_from(data: bytes, ds: Dataset, header_end: int) -> InstanceLayout:
    """The layout, given the header :func:`read_header` already parsed (parsing is the costly part)."""
    if header_end >= len(data):
        return InstanceLayout(header_end, None, (), False)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_little_endian:
        raise LayoutError("big-endian transfer syntaxes are not served by byte range")
    tag = struct.unpack_from("<HH", data, header_end)
    if tag != PIXEL_DATA_TAG:
        # Float or double-float pixel data, or trailing elements only: no frame access.
        return InstanceLayout(header_end, None, (), False)
    if ts.is_implicit_VR:
        (length,) = struct.unpack_from("<I", data, header_end + 4)
        value_start = header_end + 8
    else:
        (length,) = struct.unpack_from("<I", data, header_end + 8)
        value_start = header_end + 12
    frame_count = int(ds.get("NumberOfFrames", 1) or 1)
    if length == UNDEFINED_LENGTH:
        spans, end = _items(data, value_start)
        return InstanceLayout(
            header_end, (value_start, end - value_start), _encapsulated_frames(data, spans, frame_count), True
        )
    if value_start + length > len(data):
        raise LayoutError("pixel data runs past the end of the instance")
    return InstanceLayout(
        header_end, (value_start, length), _native_frames(ds, value_start, length, frame_count), False
    )


def _native_frames(ds: Dataset, start: int, length: int, count: int) -> tuple[tuple[Span, ...], ...]:
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits % 8:
        # 1-bit frames are not byte aligned; they are served as whole bulk data only.
        return ()
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    if size == 0 or size * count > length:
        raise LayoutError("pixel data is shorter than its frames")
    return tuple(((start + i * size, size),) for i in range(count))


def _items(data: bytes, pos: int) -> tuple[list[Span], int]:
    """Value spans of the items in an encapsulated sequence, and the end of the delimiter."""
    spans: list[Span] = []
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if (group, element) == SEQUENCE_DELIMITER:
            return spans, pos
        if (group, element) != ITEM or length == UNDEFINED_LENGTH or pos + length > len(data):
            raise LayoutError("encapsulated pixel data is malformed")
        spans.append((pos, length))
        pos += length
    raise LayoutError("encapsulated pixel data has no sequence delimiter")


def _encapsulated_frames(data: bytes, items: list[Span], count: int) -> tuple[tuple[Span, ...], ...]:
    if not items:
        raise LayoutError("encapsulated pixel data has no offset table item")
    table, fragments = items[0], items[1:]
    if not fragments:
        raise LayoutError("encapsulated pixel data has no fragments")
    if count == 1:
        return (tuple(fragments),)
    if len(fragments) == count:
        return tuple((f,) for f in fragments)
    if table[1] == 0 or table[1] % 4:
        # Several fragments per frame and no basic offset table: boundaries are unknown.
        return ()
    # Basic offset table: offsets of each frame's first item, relative to the first fragment's item tag.
    first_item = fragments[0][0] - 8
    starts = [first_item + off for off in struct.unpack_from(f"<{table[1] // 4}I", data, table[0])]
    frames: list[tuple[Span, ...]] = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        frames.append(tuple(f for f in fragments if start <= f[0] - 8 < end))
    return tuple(frames) if len(frames) == count and all(frames) else ()
