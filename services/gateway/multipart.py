"""multipart/related (RFC 2387) as DICOMweb uses it: parsed as a stream, built as a stream.

Parsing holds at most one part plus one network chunk in memory, so a STOW-RS upload of many
studies never has to fit in memory; a part over the limit stops the upload with PartTooLarge.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass


class MultipartError(ValueError):
    """The body is not the multipart/related the headers announce."""


class PartTooLarge(MultipartError):
    pass


@dataclass(frozen=True)
class Part:
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass(frozen=True)
class MediaType:
    """A media type with its parameters, e.g. multipart/related; type="application/dicom"."""

    type: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, value: str) -> MediaType:
        head, *rest = value.split(";")
        params: dict[str, str] = {}
        for item in rest:
            key, sep, val = item.strip().partition("=")
            if sep:
                params[key.strip().lower()] = val.strip().strip('"')
        return cls(head.strip().lower(), params)


# RFC 2046 allows 70 characters; Orthanc's DICOMweb client (1.7) sends 73 (two UUIDs), so the
# parser takes more, as Orthanc's and dcm4chee's servers do. Still bounded: the delimiter is
# searched for in every chunk.
MAX_BOUNDARY = 200


def new_boundary() -> str:
    return f"dicomsafe-{secrets.token_hex(16)}"


async def parse_parts(chunks: AsyncIterable[bytes], boundary: str, max_part_bytes: int) -> AsyncIterator[Part]:
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise MultipartError(f"boundary missing or longer than {MAX_BOUNDARY} characters")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    # A leading CRLF lets the first boundary line match the same delimiter as the others.
    buffer = bytearray(b"\r\n")
    in_preamble = True
    finished = False
    # Where the next search starts: bytes already searched are not searched again, so a large
    # part costs linear time, not quadratic (a delimiter may straddle two chunks, hence the overlap).
    searched = 0
    async for chunk in chunks:
        if finished:
            continue  # epilogue: ignored, as RFC 2046 says
        buffer += chunk
        while True:
            at = buffer.find(delimiter, searched)
            if at < 0:
                searched = max(0, len(buffer) - len(delimiter) - 2)
                if not in_preamble and len(buffer) > max_part_bytes + len(delimiter) + 16384:
                    raise PartTooLarge(f"a part exceeds {max_part_bytes} bytes")
                if in_preamble and len(buffer) > 65536:
                    raise MultipartError("no boundary in the first 64 KiB")
                break
            after = at + len(delimiter)
            if len(buffer) < after + 2:
                searched = at
                break  # need to see whether "--" (close) or CRLF follows
            closes = buffer[after : after + 2] == b"--"
            line_end = -1
            if not closes:
                line_end = buffer.find(b"\r\n", after)
                if line_end < 0:
                    searched = at
                    break  # the boundary line is not complete yet: the part is yielded once it is
            if not in_preamble:
                yield _part(bytes(buffer[:at]), max_part_bytes)
            in_preamble = False
            if closes:
                finished = True
                buffer.clear()
                break
            del buffer[: line_end + 2]
            searched = 0
    if not finished:
        raise MultipartError("body ended before the closing boundary")


def _part(raw: bytes, max_part_bytes: int) -> Part:
    if raw.startswith(b"\r\n"):
        head, body = b"", raw[2:]  # a part without header fields
    else:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("part has no header/body separator")
    if len(body) > max_part_bytes:
        raise PartTooLarge(f"a part exceeds {max_part_bytes} bytes")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return Part(headers, body)


def part_header(content_type: str, extra: Mapping[str, str] | None = None) -> bytes:
    lines = [f"Content-Type: {content_type}"] + [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def opening(boundary: str) -> bytes:
    return f"--{boundary}\r\n".encode("latin-1")


def between(boundary: str) -> bytes:
    return f"\r\n--{boundary}\r\n".encode("latin-1")


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("latin-1")
