"""Sealed-object format v1: envelope-encrypted, chunked AES-256-GCM (STREAM).

Pure library: no Vault, no gRPC, no file-system policy.  The caller supplies a
fresh 256-bit data key (DEK) per object together with its wrapped form (Vault
Transit ciphertext such as ``vault:v3:...``); this module only lays out bytes,
encrypts and verifies.

Object layout::

    header (see SealedHeader.encode) || chunk 0 || chunk 1 || ... || chunk n-1

Every chunk is ``AES-256-GCM(K, nonce_i, plaintext_i, AD)`` (ciphertext with
the 16-byte tag appended).  ``K`` is the DEK, or for an object with an erasure key
reference (a patient's object) the key :func:`content_key` derives from the DEK and
the patient's erasure key (HKDF-SHA256, salt = erasure key, info = domain || object
id), so destroying the erasure key makes the object unreadable even with the DEK.
``nonce_i`` is the STREAM nonce (Hoang, Reyhanitabar, Rogaway, Vizar 2015)::

    nonce_prefix (7 bytes) || u32 big-endian chunk index || last-chunk flag (1 byte)

``AD`` is SHA-256 over a domain-separated canonical encoding of the *immutable*
header fields only (magic, format version, nonce prefix, chunk size, object id,
SOP Instance UID, Study Instance UID, erasure key reference).  The key name, key
version and wrapped DEK are deliberately not bound, so :func:`rewrap_header` can
replace them after a Vault key rotation without touching a single ciphertext byte.
Substituting a wrapped DEK from another object still fails: it unwraps to a
different DEK and every chunk fails authentication.

Every object has at least one chunk.  All chunks but the last hold exactly
``chunk_size`` plaintext bytes; the last (final-flag) chunk holds
``0..chunk_size`` bytes and is empty only when the whole object is empty.

Streaming caveat: :class:`SealReader` and :func:`open_stream` release each chunk's
plaintext as soon as *that chunk* is authenticated, before the end of the object
has been seen.  Truncation (a missing final chunk) and trailing data are only
detected at the end, by an exception from ``finalize()`` / the iterator.  A
consumer must treat everything it received as untrusted-and-incomplete unless
the stream finished without raising.  (:func:`iter_range` authenticates the final
chunk before it yields anything, so a truncated object fails a range read at once.)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "SealReader",
    "SealWriter",
    "SealedFormatError",
    "SealedHeader",
    "SealedObjectCorrupt",
    "SealedRangeError",
    "UnsupportedFormatVersion",
    "iter_range",
    "new_nonce_prefix",
    "open_bytes",
    "open_range",
    "open_stream",
    "plaintext_length",
    "read_header",
    "rewrap_header",
    "seal_bytes",
]

# --------------------------------------------------------------------------
# Constants

#: PNG-style signature: a high-bit byte, "DSF", CR LF, ^Z, LF.  Detects 7-bit
#: transports and text-mode line-ending conversion as well as foreign files.
MAGIC = b"\x89DSF\r\n\x1a\n"
FORMAT_VERSION = 1

#: 256 KiB: one 512 KiB CT frame spans 2-3 chunks, so a frame range read decrypts
#: at most ~768 KiB; per-chunk overhead (16-byte tag, one AEAD call, a few Python
#: operations) stays well under 5 % of the AES-GCM time; a chunk fits comfortably
#: in one gRPC message (4 MiB default limit); a stream holds at most ~2 chunks.
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 4 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024

TAG_SIZE = 16
DEK_SIZE = 32
NONCE_PREFIX_SIZE = 7
MAX_CHUNK_INDEX = 0xFFFF_FFFF

MAX_OBJECT_ID_BYTES = 1024
MAX_UID_CHARS = 64
MAX_KEY_NAME_BYTES = 255
MAX_WRAPPED_DEK_BYTES = 4096
MAX_HEADER_SIZE = 16 * 1024

_FIXED_PREFIX = struct.Struct(">8sBI")  # magic, version, header length
_FIXED_PREFIX_SIZE = _FIXED_PREFIX.size  # 13
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_NONCE_TAIL = struct.Struct(">IB")
_AD_DOMAIN = b"dicomsafe/sealed-object/v1/chunk-associated-data\x00"

_UID_RE = re.compile(r"[0-9.]{1,64}")
_ERASURE_REF_RE = re.compile(r"[0-9a-f]{0,64}")
_PRINTABLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")
_VAULT_VERSION_RE = re.compile(r"vault:v([0-9]+):")

BytesLike = bytes | bytearray | memoryview


# --------------------------------------------------------------------------
# Errors (messages never contain key material, plaintext or ciphertext)


class SealedFormatError(Exception):
    """Base class for every error raised by this module (except ValueError/TypeError
    for invalid arguments supplied by the caller)."""


class SealedObjectCorrupt(SealedFormatError):
    """The object failed authentication or is structurally invalid: tampered,
    truncated, extended, reordered, spliced, or opened with the wrong DEK."""


class UnsupportedFormatVersion(SealedFormatError):
    """The magic matched but the format version is not one this code reads."""


class SealedRangeError(SealedFormatError):
    """A requested plaintext range lies (partly) past the authenticated end."""


# --------------------------------------------------------------------------
# I/O protocols


@runtime_checkable
class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class SeekableReadable(Readable, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


# --------------------------------------------------------------------------
# Header


def new_nonce_prefix() -> bytes:
    """Return a fresh random 7-byte STREAM nonce prefix (os.urandom)."""
    return os.urandom(NONCE_PREFIX_SIZE)


def _check_ascii(name: str, value: str, max_len: int) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str")
    if len(value) > max_len or not _PRINTABLE_ASCII_RE.fullmatch(value):
        raise ValueError(f"{name} must be 1..{max_len} printable ASCII characters without spaces")
    return value.encode("ascii")


def _check_uid(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str")
    if not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} must be 1..{MAX_UID_CHARS} characters of [0-9.]")
    return value.encode("ascii")


@dataclass(frozen=True)
class SealedHeader:
    """Decoded v1 header.  Construct with :meth:`create` for a new object."""

    key_name: str
    key_version: int
    wrapped_dek: str
    nonce_prefix: bytes
    chunk_size: int
    object_id: str
    sop_instance_uid: str
    study_instance_uid: str
    # Names the per-patient erasure key mixed into the content key ("" = none); bound, so it
    # cannot be swapped to dodge an erasure.
    erasure_key_ref: str = ""

    def __post_init__(self) -> None:
        _check_ascii("key_name", self.key_name, MAX_KEY_NAME_BYTES)
        _check_ascii("wrapped_dek", self.wrapped_dek, MAX_WRAPPED_DEK_BYTES)
        if type(self.key_version) is not int or not 1 <= self.key_version <= 0xFFFF_FFFF:
            raise ValueError("key_version must be an int in 1..2**32-1")
        m = _VAULT_VERSION_RE.match(self.wrapped_dek)
        if m is not None and int(m.group(1)) != self.key_version:
            raise ValueError("key_version does not match the vault:vN: wrapped DEK")
        if type(self.nonce_prefix) is not bytes or len(self.nonce_prefix) != 7:
            raise ValueError("nonce_prefix must be 7 bytes")
        if type(self.chunk_size) is not int or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be an int in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not isinstance(self.object_id, str):
            raise TypeError("object_id must be str")
        try:
            oid = self.object_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("object_id is not encodable as UTF-8") from None
        if not 1 <= len(oid) <= MAX_OBJECT_ID_BYTES:
            raise ValueError(f"object_id must be 1..{MAX_OBJECT_ID_BYTES} UTF-8 bytes")
        _check_uid("sop_instance_uid", self.sop_instance_uid)
        _check_uid("study_instance_uid", self.study_instance_uid)
        if not isinstance(self.erasure_key_ref, str) or not _ERASURE_REF_RE.fullmatch(self.erasure_key_ref):
            raise ValueError("erasure_key_ref must be 0..64 lowercase hex characters")

    @classmethod
    def create(
        cls,
        *,
        key_name: str,
        key_version: int,
        wrapped_dek: str,
        object_id: str,
        sop_instance_uid: str,
        study_instance_uid: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        erasure_key_ref: str = "",
    ) -> SealedHeader:
        """A header for a new object, with a fresh random nonce prefix."""
        return cls(
            key_name=key_name,
            key_version=key_version,
            wrapped_dek=wrapped_dek,
            nonce_prefix=new_nonce_prefix(),
            chunk_size=chunk_size,
            object_id=object_id,
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            erasure_key_ref=erasure_key_ref,
        )

    # -- encoding ---------------------------------------------------------

    def _immutable_fields(self) -> bytes:
        # nonce_prefix || u32 chunk_size || (u16 len || bytes) x 4
        parts = [self.nonce_prefix, _U32.pack(self.chunk_size)]
        for value in (
            self.object_id.encode("utf-8"),
            self.sop_instance_uid.encode("ascii"),
            self.study_instance_uid.encode("ascii"),
            self.erasure_key_ref.encode("ascii"),
        ):
            parts += (_U16.pack(len(value)), value)
        return b"".join(parts)

    def _key_fields(self) -> bytes:
        name = self.key_name.encode("ascii")
        wrapped = self.wrapped_dek.encode("ascii")
        return b"".join(
            (
                _U16.pack(len(name)),
                name,
                _U32.pack(self.key_version),
                _U16.pack(len(wrapped)),
                wrapped,
            )
        )

    def encode(self) -> bytes:
        """Canonical byte encoding (decode(encode(h)) == (h, len))."""
        body = self._immutable_fields() + self._key_fields()
        total = _FIXED_PREFIX_SIZE + len(body)
        return _FIXED_PREFIX.pack(MAGIC, FORMAT_VERSION, total) + body

    @property
    def associated_data(self) -> bytes:
        """32-byte AD bound to every chunk: SHA-256(domain || magic || version ||
        immutable fields).  Independent of key name/version and wrapped DEK."""
        return hashlib.sha256(_AD_DOMAIN + MAGIC + bytes((FORMAT_VERSION,)) + self._immutable_fields()).digest()

    def with_key(self, key_name: str, key_version: int, wrapped_dek: str) -> SealedHeader:
        """Copy with new key name / version / wrapped DEK (same AD)."""
        return replace(self, key_name=key_name, key_version=key_version, wrapped_dek=wrapped_dek)

    # -- decoding ---------------------------------------------------------

    @classmethod
    def decode(cls, buf: BytesLike) -> tuple[SealedHeader, int]:
        """Parse a header at the start of ``buf``; return it and its length.

        Bytes after the header (the chunks) are ignored.  Raises
        SealedObjectCorrupt / UnsupportedFormatVersion.
        """
        mv = memoryview(buf).cast("B")
        header_len = _check_prefix(mv[:_FIXED_PREFIX_SIZE])
        if len(mv) < header_len:
            raise SealedObjectCorrupt("truncated header")
        return _parse_body(mv[_FIXED_PREFIX_SIZE:header_len]), header_len


def _check_prefix(prefix: memoryview | bytes) -> int:
    if len(prefix) < _FIXED_PREFIX_SIZE:
        raise SealedObjectCorrupt("truncated header")
    magic, version, header_len = _FIXED_PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise SealedObjectCorrupt("not a sealed object (bad magic)")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersion(f"unsupported sealed format version {version}")
    if not _FIXED_PREFIX_SIZE < header_len <= MAX_HEADER_SIZE:
        raise SealedObjectCorrupt("invalid header length")
    return int(header_len)


class _Cursor:
    __slots__ = ("mv", "pos")

    def __init__(self, mv: memoryview) -> None:
        self.mv = mv
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.mv):
            raise SealedObjectCorrupt("malformed header (field overruns header)")
        out = bytes(self.mv[self.pos : end])
        self.pos = end
        return out

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def text(self, encoding: str) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            raise SealedObjectCorrupt("malformed header (bad text field)") from None


def _parse_body(body: memoryview) -> SealedHeader:
    cur = _Cursor(body)
    nonce_prefix = cur.take(NONCE_PREFIX_SIZE)
    chunk_size = cur.u32()
    object_id = cur.text("utf-8")
    sop = cur.text("ascii")
    study = cur.text("ascii")
    erasure_ref = cur.text("ascii")
    key_name = cur.text("ascii")
    key_version = cur.u32()
    wrapped = cur.text("ascii")
    if cur.pos != len(body):
        raise SealedObjectCorrupt("malformed header (trailing bytes)")
    try:
        return SealedHeader(
            key_name=key_name,
            key_version=key_version,
            wrapped_dek=wrapped,
            nonce_prefix=nonce_prefix,
            chunk_size=chunk_size,
            object_id=object_id,
            sop_instance_uid=sop,
            study_instance_uid=study,
            erasure_key_ref=erasure_ref,
        )
    except ValueError:
        # The field validators' messages name fields only, never values.
        raise SealedObjectCorrupt("malformed header (invalid field)") from None


def _read_exact(f: Readable, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_header(fileobj: Readable) -> tuple[SealedHeader, int]:
    """Read exactly one header from ``fileobj`` (left positioned at chunk 0)."""
    prefix = _read_exact(fileobj, _FIXED_PREFIX_SIZE)
    header_len = _check_prefix(prefix)
    rest = _read_exact(fileobj, header_len - _FIXED_PREFIX_SIZE)
    if len(rest) != header_len - _FIXED_PREFIX_SIZE:
        raise SealedObjectCorrupt("truncated header")
    return _parse_body(memoryview(rest)), header_len


def rewrap_header(
    header_bytes: BytesLike,
    new_key_name: str,
    new_key_version: int,
    new_wrapped_dek: str,
) -> bytes:
    """Return ``header_bytes`` with the key name/version and wrapped DEK replaced.

    ``header_bytes`` must be exactly one encoded header.  The chunks are not
    touched: the new object is ``new_header || old_object[len(header_bytes):]``.
    The header length may change (e.g. ``vault:v9`` -> ``vault:v10``), so the
    object must be rewritten rather than patched in place.
    """
    header, header_len = SealedHeader.decode(header_bytes)
    if header_len != len(memoryview(header_bytes).cast("B")):
        raise ValueError("header_bytes must contain exactly one header")
    return header.with_key(new_key_name, new_key_version, new_wrapped_dek).encode()


# --------------------------------------------------------------------------
# Chunk engine


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + _NONCE_TAIL.pack(index, final)


def _open_chunk(aead: AESGCM, prefix: bytes, ad: bytes, index: int, final: bool, data: BytesLike) -> bytes:
    try:
        return aead.decrypt(_nonce(prefix, index, final), data, ad)
    except InvalidTag:
        kind = "final chunk" if final else "chunk"
        raise SealedObjectCorrupt(
            f"{kind} {index} failed authentication (tampered, truncated, extended, reordered or wrong key)"
        ) from None


_CONTENT_KEY_INFO = b"dicomsafe/sealed-object/v1/content-key\x00"


def content_key(dek: BytesLike, erasure_key: BytesLike | None, header: SealedHeader) -> bytes:
    """The AES-256 key of the chunks.

    Without an erasure key reference it is the DEK itself. With one, it is
    HKDF-SHA256(ikm=DEK, salt=erasure key, info=domain || object id): the Vault-wrapped DEK
    alone no longer opens the object, so destroying the patient's erasure key shreds every
    object of that patient at once, wherever copies of them are kept.
    """
    if not header.erasure_key_ref:
        if erasure_key is not None:
            raise ValueError("object has no erasure key reference")
        return bytes(dek)
    if erasure_key is None or len(memoryview(erasure_key).cast("B")) != DEK_SIZE:
        raise ValueError("object needs its 32-byte erasure key")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=DEK_SIZE,
        salt=bytes(erasure_key),
        info=_CONTENT_KEY_INFO + header.object_id.encode(),
    )
    return hkdf.derive(bytes(dek))


def _aead(dek: BytesLike) -> AESGCM:
    if len(memoryview(dek).cast("B")) != DEK_SIZE:
        raise ValueError("DEK must be 32 bytes (AES-256)")
    return AESGCM(bytes(dek))


class _Chunker:
    """Common framing: split input into fixed-size units, holding back the last
    complete unit until it is known whether more data follows (so the final
    flag is set correctly).  Buffers at most one unit."""

    def __init__(self, dek: BytesLike, header: SealedHeader, unit: int) -> None:
        self._aead = _aead(dek)
        self._ad = header.associated_data
        self._prefix = header.nonce_prefix
        self._unit = unit
        self._buf = bytearray()
        self._held: bytes | None = None  # a complete unit kept by reference
        self._index = 0
        self._done = False

    @property
    def buffered(self) -> int:
        """Number of input bytes currently buffered (always <= one unit)."""
        return len(self._buf) if self._held is None else len(self._held)

    @property
    def chunks_processed(self) -> int:
        """Number of chunks sealed/opened so far (the next chunk index)."""
        return self._index

    def _process(self, unit: BytesLike, final: bool) -> bytes:
        raise NotImplementedError

    def _emit(self, unit: BytesLike, final: bool) -> bytes:
        # A non-final chunk at MAX_CHUNK_INDEX would leave no index for the final.
        if self._index > MAX_CHUNK_INDEX or (not final and self._index == MAX_CHUNK_INDEX):
            self._done = True
            self._overflow()
        out = self._process(unit, final)
        self._index += 1
        return out

    def _overflow(self) -> None:
        raise SealedFormatError("object too large: chunk index would overflow 2**32-1")

    def _check_open(self) -> None:
        if self._done:
            raise SealedFormatError("stream already finalized or failed")

    def update_chunks(self, data: BytesLike) -> list[bytes]:
        """Feed bytes; return the output of every unit now known to be non-final."""
        self._check_open()
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n == 0:
            return []
        unit = self._unit
        out: list[bytes] = []
        pos = 0
        try:
            if self._held is not None:
                out.append(self._emit(self._held, False))
                self._held = None
            elif self._buf:
                take = min(unit - len(self._buf), n)
                self._buf += mv[:take]
                pos = take
                if pos < n:  # buffer is full and more data follows
                    out.append(self._emit(self._buf, False))
                    self._buf.clear()
            while n - pos > unit:
                out.append(self._emit(mv[pos : pos + unit], False))
                pos += unit
            if pos < n:
                if pos == 0 and n == unit and type(data) is bytes:
                    self._held = data  # immutable: keep a reference, no copy
                else:
                    self._buf += mv[pos:]
        except BaseException:
            self._done = True
            raise
        return out

    def update(self, data: BytesLike) -> bytes:
        """Like update_chunks() but concatenated (no copy when <= one chunk)."""
        out = self.update_chunks(data)
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_last(self) -> bytes | bytearray:
        self._check_open()
        self._done = True
        if self._held is not None:
            last: bytes | bytearray = self._held
            self._held = None
        else:
            last = self._buf
        return last


class SealWriter(_Chunker):
    """Incremental sealing.  Output = header_bytes() + update()... + finalize().

    Memory is bounded: at most one chunk of plaintext is buffered, whatever the
    size and boundaries of the pieces given to update().
    """

    def __init__(self, dek: BytesLike, header: SealedHeader) -> None:
        super().__init__(dek, header, header.chunk_size)
        self._header_bytes = header.encode()
        self.header = header

    def header_bytes(self) -> bytes:
        return self._header_bytes

    def _process(self, unit: BytesLike, final: bool) -> bytes:
        return self._aead.encrypt(_nonce(self._prefix, self._index, final), unit, self._ad)

    def finalize(self) -> bytes:
        """Seal and return the final chunk (an empty one for an empty object)."""
        last = self._take_last()
        out = self._emit(last, True)
        self._buf = bytearray()
        return out


class SealReader(_Chunker):
    """Incremental verification/decryption of the chunks that follow a header.

    update() returns plaintext of chunks that were authenticated as non-final;
    finalize() authenticates the final chunk and returns its plaintext.  If
    finalize() is never reached or raises, the object is truncated or corrupt
    and everything returned so far must be discarded (see module docstring).
    """

    def __init__(self, dek: BytesLike, header: SealedHeader) -> None:
        super().__init__(dek, header, header.chunk_size + TAG_SIZE)

    def _process(self, unit: BytesLike, final: bool) -> bytes:
        return _open_chunk(self._aead, self._prefix, self._ad, self._index, final, unit)

    def _overflow(self) -> None:
        raise SealedObjectCorrupt("object has more chunks than the format allows")

    def finalize(self) -> bytes:
        last = self._take_last()
        if len(last) < TAG_SIZE:
            raise SealedObjectCorrupt(
                "object truncated: missing chunks"
                if self._index == 0 and not last
                else f"object truncated inside chunk {self._index}"
            )
        if len(last) == TAG_SIZE and self._index > 0:
            raise SealedObjectCorrupt("empty final chunk after data (non-canonical)")
        out = self._emit(last, True)
        self._buf = bytearray()
        return out


# --------------------------------------------------------------------------
# Whole-object and streaming helpers


def seal_bytes(dek: BytesLike, header: SealedHeader, plaintext: BytesLike) -> bytes:
    """Seal a whole in-memory object (header + chunks)."""
    w = SealWriter(dek, header)
    return b"".join([w.header_bytes(), *w.update_chunks(plaintext), w.finalize()])


def open_bytes(dek: BytesLike, sealed: BytesLike) -> tuple[SealedHeader, bytes]:
    """Verify and decrypt a whole in-memory object; return (header, plaintext)."""
    header, header_len = SealedHeader.decode(sealed)
    r = SealReader(dek, header)
    body = memoryview(sealed).cast("B")[header_len:]
    return header, b"".join([*r.update_chunks(body), r.finalize()])


def open_stream(
    dek: BytesLike,
    header: SealedHeader,
    source: Readable | Iterable[BytesLike],
) -> Iterator[bytes]:
    """Yield verified plaintext chunk by chunk.

    ``source`` is a binary file object positioned at chunk 0 (e.g. after
    read_header) or an iterable of byte pieces with arbitrary boundaries.
    Raises SealedObjectCorrupt on authentication failure, reordering,
    duplication, splicing, truncation or trailing data - the last two only once
    the source is exhausted, after earlier chunks have been yielded.
    """
    reader = SealReader(dek, header)
    pieces: Iterable[BytesLike]
    if isinstance(source, Readable):
        f = source
        unit = header.chunk_size + TAG_SIZE
        pieces = iter(lambda: _read_exact(f, unit), b"")
    else:
        pieces = source
    for piece in pieces:
        yield from reader.update_chunks(piece)
    last = reader.finalize()
    if last:
        yield last


# --------------------------------------------------------------------------
# Random access


def _layout(header: SealedHeader, header_len: int, file_size: int) -> tuple[int, int]:
    """(number of chunks, plaintext length) implied by the file size (unverified)."""
    if header_len <= _FIXED_PREFIX_SIZE or file_size < header_len:
        raise SealedObjectCorrupt("object truncated inside header")
    body = file_size - header_len
    seg = header.chunk_size + TAG_SIZE
    if body == 0:
        raise SealedObjectCorrupt("object truncated: missing chunks")
    n = -(-body // seg)
    last = body - (n - 1) * seg
    if last < TAG_SIZE:
        raise SealedObjectCorrupt(f"object truncated inside chunk {n - 1}")
    if last == TAG_SIZE and n > 1:
        raise SealedObjectCorrupt("empty final chunk after data (non-canonical)")
    if n - 1 > MAX_CHUNK_INDEX:
        raise SealedObjectCorrupt("object has more chunks than the format allows")
    return n, (n - 1) * header.chunk_size + (last - TAG_SIZE)


def plaintext_length(header: SealedHeader, header_len: int, file_size: int) -> int:
    """Plaintext length implied by the stored size.  Not authenticated by itself:
    open_range(..., verify_end=True) / open_stream confirm it."""
    return _layout(header, header_len, file_size)[1]


def iter_range(
    dek: BytesLike,
    header: SealedHeader,
    header_len: int,
    fileobj: SeekableReadable,
    offset: int,
    length: int,
    *,
    verify_end: bool = True,
) -> Iterator[bytes]:
    """Yield the verified plaintext bytes [offset, offset+length) one chunk at a time,
    reading only the chunks that cover them (plus the final chunk when ``verify_end``).

    Memory stays at about one chunk whatever the range.  Guarantees: every yielded byte is
    authentic plaintext of this object at that position (chunk index and object binding are
    authenticated).  With ``verify_end`` (default) the last chunk of the file is authenticated
    as the final chunk *before* anything is yielded, so the object length derived from the
    file size is authentic: truncation/extension anywhere is detected, and a range past the
    real end raises SealedRangeError.  With ``verify_end=False`` truncation at a chunk boundary
    outside the range is not detected; a range that reaches the last stored chunk is still
    checked against the final flag.  A range past the stored end always triggers the
    final-chunk check first, so a truncated object raises SealedObjectCorrupt rather than
    SealedRangeError.  Errors are raised by the iterator, as it reaches them.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be non-negative")
    file_size = fileobj.seek(0, io.SEEK_END)
    n, total = _layout(header, header_len, file_size)
    aead = _aead(dek)
    prefix, ad = header.nonce_prefix, header.associated_data
    cs = header.chunk_size
    seg = cs + TAG_SIZE
    end = offset + length

    def open_chunk(i: int) -> bytes:
        start = header_len + i * seg
        size = min(file_size, start + seg) - start
        fileobj.seek(start)
        data = _read_exact(fileobj, size)
        if len(data) != size:
            raise SealedObjectCorrupt("object changed while reading")
        return _open_chunk(aead, prefix, ad, i, i == n - 1, data)

    if end > total or length == 0:
        if verify_end or end > total:
            open_chunk(n - 1)
        if end > total:
            raise SealedRangeError("requested range extends past end of object")
        return

    first, last = offset // cs, (end - 1) // cs
    # Before any byte is yielded, also when the range ends in the final chunk: otherwise the
    # chunks before it would go out before a truncation at a chunk boundary is detected.
    if verify_end and first < n - 1:
        open_chunk(n - 1)
    for i in range(first, last + 1):
        plain = open_chunk(i)
        lo = offset - i * cs if i == first else 0
        hi = end - i * cs if i == last else len(plain)
        yield plain if (lo, hi) == (0, len(plain)) else plain[lo:hi]


def open_range(
    dek: BytesLike,
    header: SealedHeader,
    header_len: int,
    fileobj: SeekableReadable,
    offset: int,
    length: int,
    *,
    verify_end: bool = True,
) -> bytes:
    """:func:`iter_range` joined: the whole range in memory (for small ranges and tests)."""
    return b"".join(iter_range(dek, header, header_len, fileobj, offset, length, verify_end=verify_end))
