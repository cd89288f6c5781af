"""Reading audit records straight from BSON bytes, for verification at wire speed.

A record's hash covers its event's BSON bytes as stored (chain.py, version 2), so verifying
needs the record's few top-level fields and the event's bytes — not a decoded event. The
driver's generic decoding (or its lazy raw documents) costs several times the hashing
itself; this walks the top level once and keeps embedded documents as bytes. Anything
beyond the few types audit records use is handed to the driver's decoder instead, so an
unusual (e.g. tampered) record is still checked, only more slowly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import bson
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_STRING, _DOCUMENT, _ARRAY, _DATETIME, _INT32_TYPE, _INT64_TYPE = 0x02, 0x03, 0x04, 0x09, 0x10, 0x12
# The slow path: the driver's decoder, embedded documents kept raw, dates as stored (ms).
_GENERIC: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_MS
)


class _Unusual(Exception):
    """A type the fast path does not read."""


def documents(batch: bytes) -> Iterator[bytes]:
    """The documents of a batch of concatenated BSON documents (a raw cursor batch)."""
    view, i = memoryview(batch), 0
    while i < len(batch):
        size = _INT32.unpack_from(batch, i)[0]
        if size < 5 or i + size > len(batch):
            raise BSONError("truncated BSON batch")
        yield bytes(view[i : i + size])
        i += size


def top_level(doc: bytes) -> dict[str, Any]:
    """A document's top-level fields; embedded documents as their BSON bytes, dates as
    ``DatetimeMS``. Raises ``BSONError`` for bytes that are no document."""
    try:
        return _fast(doc)
    except (_Unusual, IndexError, ValueError, struct.error):
        pass  # the driver's decoder decides (and raises for bytes that are no document)
    generic = bson.decode(doc, _GENERIC)
    return {k: bytes(v.raw) if isinstance(v, RawBSONDocument) else v for k, v in generic.items()}


def string_field(doc: bytes, name: str) -> str | None:
    """One top-level string of a document (e.g. an event's id), or None; reads no further
    than that field when the fields before it are of the usual types."""
    try:
        return _find_string(doc, name.encode())
    except (_Unusual, IndexError, ValueError, struct.error):
        pass
    value = bson.decode(doc, _GENERIC).get(name)
    return value if isinstance(value, str) else None


def _find_string(doc: bytes, wanted: bytes) -> str | None:
    end = _INT32.unpack_from(doc, 0)[0] - 1
    if end != len(doc) - 1 or doc[end] != 0:
        raise ValueError("document length")
    i = 4
    while i < end:
        kind = doc[i]
        name_end = doc.index(0, i + 1)
        name = doc[i + 1 : name_end]
        i = name_end + 1
        if kind in (_STRING, _DOCUMENT, _ARRAY):
            size = _sized(doc, i, 1 if kind == _STRING else 5)
            if name == wanted:
                return doc[i + 4 : i + 3 + size].decode() if kind == _STRING else None
            i += size + (4 if kind == _STRING else 0)
        elif kind == _INT32_TYPE:
            i += 4
        elif kind in (_INT64_TYPE, _DATETIME):
            i += 8
        else:
            raise _Unusual
        if name == wanted:
            return None
    return None


def _sized(doc: bytes, i: int, least: int) -> int:
    size: int = _INT32.unpack_from(doc, i)[0]
    if size < least:
        raise ValueError("negative or short length")
    return size


def _fast(doc: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    end = _INT32.unpack_from(doc, 0)[0] - 1
    if end != len(doc) - 1 or doc[end] != 0:
        raise ValueError("document length")
    i = 4
    while i < end:
        kind = doc[i]
        name_end = doc.index(0, i + 1)
        name = doc[i + 1 : name_end].decode()
        i = name_end + 1
        if kind == _STRING:
            size = _sized(doc, i, 1)
            out[name] = doc[i + 4 : i + 3 + size].decode()
            i += 4 + size
        elif kind == _DOCUMENT:
            size = _sized(doc, i, 5)
            out[name] = doc[i : i + size]
            i += size
        elif kind == _INT32_TYPE:
            out[name] = _INT32.unpack_from(doc, i)[0]
            i += 4
        elif kind == _INT64_TYPE:
            out[name] = _INT64.unpack_from(doc, i)[0]
            i += 8
        elif kind == _DATETIME:
            out[name] = DatetimeMS(_INT64.unpack_from(doc, i)[0])
            i += 8
        else:
            raise _Unusual
    if i != end:
        raise ValueError("element overruns the document")
    return out
