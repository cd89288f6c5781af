"""Reading audit records straight from their BSON bytes, for verification at wire speed.

A version 2 record's hash covers its BSON elements as stored (chain.py), so verifying needs
the bytes of those elements and a few top-level values — not a decoded document. This walks
a document's top level once: values of the types audit records use are read (strings,
integers, dates; embedded documents kept as their bytes), any other type is skipped by its
size and shows up as ``Other``, which no check accepts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bson.datetime_ms import DatetimeMS
from bson.errors import BSONError

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_STRING, _DOCUMENT, _ARRAY, _BINARY, _DATETIME, _REGEX, _INT32_TYPE, _INT64_TYPE = (
    0x02,
    0x03,
    0x04,
    0x05,
    0x09,
    0x0B,
    0x10,
    0x12,
)
# Fixed-size BSON types → value size (double, undefined, ObjectId, bool, null, timestamp,
# decimal128, min key, max key).
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x0A: 0, 0x11: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}
# Types whose value starts with an int32 length of what follows (string, JS code, symbol) or
# of the whole value (code with scope).
_STRING_LIKE = {_STRING, 0x0D, 0x0E}


@dataclass(frozen=True)
class Other:
    """A value of a type audit records never hold (so never equal to what a check expects)."""

    kind: int


@dataclass(frozen=True)
class Parsed:
    fields: dict[str, Any]
    # The document's elements as stored, except `_id` and `hash`: what a version 2 hash covers.
    hashed: bytes


def documents(batch: bytes) -> Iterator[bytes]:
    """The documents of a batch of concatenated BSON documents (a raw cursor batch)."""
    view, i = memoryview(batch), 0
    while i < len(batch):
        size = _INT32.unpack_from(batch, i)[0]
        if size < 5 or i + size > len(batch):
            raise BSONError("truncated BSON batch")
        yield bytes(view[i : i + size])
        i += size


def parse(doc: bytes) -> Parsed:
    """Top-level fields (embedded documents as BSON bytes, dates as ``DatetimeMS``) and the
    hashed elements. Raises ``BSONError`` for bytes that are no document."""
    try:
        return _walk(doc)
    except (IndexError, ValueError, struct.error) as exc:
        raise BSONError("malformed BSON document") from exc


def string_field(doc: bytes, name: str) -> str | None:
    """One top-level string of a document (e.g. an event's id), or None."""
    value = parse(doc).fields.get(name)
    return value if isinstance(value, str) else None


def _walk(doc: bytes) -> Parsed:
    fields: dict[str, Any] = {}
    hashed: list[bytes] = []
    end = _INT32.unpack_from(doc, 0)[0] - 1
    if end != len(doc) - 1 or doc[end] != 0:
        raise ValueError("document length")
    i = 4
    while i < end:
        start, kind = i, doc[i]
        name_end = doc.index(0, i + 1)
        name = doc[i + 1 : name_end].decode()
        i = name_end + 1
        if kind in _STRING_LIKE:
            size = _sized(doc, i, 1)
            fields[name] = doc[i + 4 : i + 3 + size].decode() if kind == _STRING else Other(kind)
            i += 4 + size
        elif kind == _DOCUMENT:
            size = _sized(doc, i, 5)
            fields[name] = doc[i : i + size]
            i += size
        elif kind in (_ARRAY, 0x0F):  # array, code with scope: the length covers the value
            i += _sized(doc, i, 5)
            fields[name] = Other(kind)
        elif kind == _INT32_TYPE:
            fields[name] = _INT32.unpack_from(doc, i)[0]
            i += 4
        elif kind == _INT64_TYPE:
            fields[name] = _INT64.unpack_from(doc, i)[0]
            i += 8
        elif kind == _DATETIME:
            fields[name] = DatetimeMS(_INT64.unpack_from(doc, i)[0])
            i += 8
        elif kind == _BINARY:
            i += 5 + _sized(doc, i, 0)
            fields[name] = Other(kind)
        elif kind == _REGEX:
            i = doc.index(0, doc.index(0, i) + 1) + 1
            fields[name] = Other(kind)
        elif kind == 0x0C:  # DBPointer: a string, then an ObjectId
            i += 4 + _sized(doc, i, 1) + 12
            fields[name] = Other(kind)
        elif kind in _FIXED:
            i += _FIXED[kind]
            fields[name] = Other(kind)
        else:
            raise ValueError("unknown BSON type")
        if name not in ("_id", "hash"):
            hashed.append(doc[start:i])
    if i != end:
        raise ValueError("element overruns the document")
    return Parsed(fields, b"".join(hashed))


def _sized(doc: bytes, i: int, least: int) -> int:
    size: int = _INT32.unpack_from(doc, i)[0]
    if size < least:
        raise ValueError("negative or short length")
    return size
