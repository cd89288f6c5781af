"""Unit tests for the sealed-object format (dicomsafe/storage/sealed_format.py)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dicomsafe.storage import sealed_format as sf
from dicomsafe.storage.sealed_format import (
    MAGIC,
    MAX_CHUNK_INDEX,
    SealedFormatError,
    SealedHeader,
    SealedObjectCorrupt,
    SealedRangeError,
    SealReader,
    SealWriter,
    UnsupportedFormatVersion,
    open_bytes,
    open_range,
    open_stream,
    plaintext_length,
    read_header,
    rewrap_header,
    seal_bytes,
)

pytestmark = pytest.mark.unit

CS = 4096  # smallest allowed chunk size: many chunks for little data
TAG = 16
SEG = CS + TAG

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_header(**kw: object) -> SealedHeader:
    fields: dict[str, object] = {
        "key_name": "dicom-objects",
        "key_version": 3,
        "wrapped_dek": "vault:v3:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=",
        "nonce_prefix": os.urandom(7),
        "chunk_size": CS,
        "object_id": "obj/2024/Ω-001",
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    }
    fields.update(kw)
    return SealedHeader(**fields)  # type: ignore[arg-type]


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def seal(plaintext: bytes, header: SealedHeader | None = None, dek: bytes | None = None) -> tuple[bytes, bytes, int]:
    """Return (dek, sealed object, header length)."""
    dek = dek if dek is not None else os.urandom(32)
    header = header if header is not None else make_header()
    blob = seal_bytes(dek, header, plaintext)
    return dek, blob, len(header.encode())


def chunks_of(blob: bytes, header_len: int, chunk_size: int = CS) -> list[bytes]:
    body = blob[header_len:]
    seg = chunk_size + TAG
    return [body[i : i + seg] for i in range(0, len(body), seg)]


def open_all(dek: bytes, blob: bytes) -> bytes:
    """Open through the streaming API (header read from a file object)."""
    f = io.BytesIO(blob)
    header, _ = read_header(f)
    return b"".join(open_stream(dek, header, f))


# ---------------------------------------------------------------- header


def test_header_encode_decode_roundtrip_and_read_header_position() -> None:
    h = make_header()
    enc = h.encode()
    assert enc[:8] == MAGIC and enc[8] == 1
    assert struct.unpack(">I", enc[9:13])[0] == len(enc)
    dec, n = SealedHeader.decode(enc + b"chunks follow")
    assert (dec, n) == (h, len(enc))
    f = io.BytesIO(enc + b"REST")
    assert read_header(f) == (h, len(enc))
    assert f.read() == b"REST"


def test_header_byte_layout_matches_documentation() -> None:
    """Independent re-implementation of the documented v1 layout and AD."""
    prefix = bytes.fromhex("00112233445566")
    h = make_header(
        chunk_size=262144,
        nonce_prefix=prefix,
        object_id="o1",
        sop_instance_uid="1.2",
        study_instance_uid="1.3",
        key_name="k",
        key_version=7,
        wrapped_dek="vault:v7:AAAA",
    )
    # The last immutable field is the (empty) erasure key reference.
    immutable = prefix + bytes.fromhex("00040000") + b"\x00\x02o1" + b"\x00\x031.2" + b"\x00\x031.3" + b"\x00\x00"
    keyfields = b"\x00\x01k" + bytes.fromhex("00000007") + b"\x00\x0dvault:v7:AAAA"
    total = 13 + len(immutable) + len(keyfields)
    expected = b"\x89DSF\r\n\x1a\n" + b"\x01" + struct.pack(">I", total) + immutable + keyfields
    assert h.encode() == expected
    ad = hashlib.sha256(b"dicomsafe/sealed-object/v1/chunk-associated-data\x00" + MAGIC + b"\x01" + immutable).digest()
    assert h.associated_data == ad

    # Chunk encryption per the documented STREAM nonce.
    dek = bytes(range(32))
    pt = b"x" * 300000  # chunk 0 full (non-final), chunk 1 final with 37856 bytes
    blob = seal_bytes(dek, h, pt)
    aead = AESGCM(dek)
    c0 = aead.encrypt(prefix + b"\x00\x00\x00\x00\x00", pt[:262144], ad)
    c1 = aead.encrypt(prefix + b"\x00\x00\x00\x01\x01", pt[262144:], ad)
    assert blob == expected + c0 + c1


@pytest.mark.parametrize(
    "change",
    [
        {"sop_instance_uid": "1.2.a"},
        {"sop_instance_uid": "1" * 65},
        {"study_instance_uid": ""},
        {"object_id": ""},
        {"object_id": "x" * 1025},
        {"object_id": "\udc80"},
        {"chunk_size": 4095},
        {"chunk_size": 16 * 1024 * 1024 + 1},
        {"nonce_prefix": b"123456"},
        {"key_version": 0},
        {"key_version": 2**32},
        {"key_name": "has space"},
        {"key_name": ""},
        {"wrapped_dek": "vault:v4:AAAA"},  # does not match key_version 3
        {"wrapped_dek": "é"},
    ],
)
def test_header_rejects_invalid_fields(change: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        make_header(**change)


def test_header_limits_accepted() -> None:
    h = make_header(
        chunk_size=16 * 1024 * 1024,
        object_id="x" * 1024,
        sop_instance_uid="1" * 64,
        wrapped_dek="opaque-wrapping",
        key_version=2**32 - 1,
    )
    assert SealedHeader.decode(h.encode())[0] == h


def test_create_uses_fresh_nonce_prefix_and_default_chunk_size() -> None:
    kw = {
        "key_name": "k",
        "key_version": 1,
        "wrapped_dek": "vault:v1:AA==",
        "object_id": "o",
        "sop_instance_uid": "1.2",
        "study_instance_uid": "1.3",
    }
    a, b = SealedHeader.create(**kw), SealedHeader.create(**kw)  # type: ignore[arg-type]
    assert a.chunk_size == sf.DEFAULT_CHUNK_SIZE == 256 * 1024
    assert len(a.nonce_prefix) == 7 and a.nonce_prefix != b.nonce_prefix
    assert a.associated_data != b.associated_data


def test_unsupported_version_and_bad_magic() -> None:
    enc = bytearray(make_header().encode())
    enc[8] = 2
    with pytest.raises(UnsupportedFormatVersion):
        SealedHeader.decode(enc)
    enc[8] = 1
    enc[0] ^= 0xFF
    with pytest.raises(SealedObjectCorrupt, match="magic"):
        SealedHeader.decode(enc)


@pytest.mark.parametrize("cut", [0, 5, 12, 13, 30])
def test_truncated_header(cut: int) -> None:
    enc = make_header().encode()
    with pytest.raises(SealedObjectCorrupt):
        SealedHeader.decode(enc[:cut])
    with pytest.raises(SealedObjectCorrupt):
        read_header(io.BytesIO(enc[:cut]))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS, 5 * CS + 17])
def test_roundtrip_sizes_and_chunk_layout(size: int) -> None:
    pt = data_of(size, size)
    dek, blob, hl = seal(pt)
    chunks = chunks_of(blob, hl)
    assert len(chunks) == max(1, -(-size // CS))  # no extra empty chunk for exact multiples
    assert all(len(c) == SEG for c in chunks[:-1])
    assert 1 <= len(chunks[-1]) <= SEG and len(chunks[-1]) == size - (len(chunks) - 1) * CS + TAG
    assert open_bytes(dek, blob)[1] == pt
    assert open_all(dek, blob) == pt
    assert plaintext_length(make_header(), hl, len(blob)) == size


def test_writer_holds_back_exactly_one_full_chunk() -> None:
    dek = os.urandom(32)
    w = SealWriter(dek, make_header())
    assert w.header_bytes() == w.header.encode()
    assert w.update(b"a" * CS) == b""  # could still be the final chunk
    assert w.buffered == CS
    out = w.update(b"b")  # now chunk 0 is known to be non-final
    assert len(out) == SEG and w.buffered == 1
    assert len(w.finalize()) == 1 + TAG
    with pytest.raises(SealedFormatError):
        w.update(b"more")
    with pytest.raises(SealedFormatError):
        w.finalize()


@FAST
@given(
    size=st.integers(0, 3 * 1024 * 1024),
    chunk_size=st.sampled_from([4096, 5000, 8192, 65536]),
    cuts=st.lists(st.integers(0, 3 * 1024 * 1024), max_size=12),
    rcuts=st.lists(st.integers(0, 3 * 1024 * 1024), max_size=12),
    seed=st.integers(0, 2**32),
)
def test_roundtrip_arbitrary_pieces(size: int, chunk_size: int, cuts: list[int], rcuts: list[int], seed: int) -> None:
    pt = data_of(size, seed)
    dek = os.urandom(32)
    header = make_header(chunk_size=chunk_size)
    w = SealWriter(dek, header)
    out = [w.header_bytes()]
    bounds = [0, *sorted(c % (size + 1) for c in cuts), size]
    for a, b in itertools.pairwise(bounds):
        out.append(w.update(memoryview(pt)[a:b] if a % 2 else pt[a:b]))
        assert w.buffered <= chunk_size
    out.append(w.finalize())
    blob = b"".join(out)
    assert blob == seal_bytes(dek, replace(header), pt)  # deterministic given DEK+header
    # Reader fed with arbitrary ciphertext boundaries (bytes and bytearray pieces).
    hl = len(w.header_bytes())
    body = blob[hl:]
    rb = [0, *sorted(c % (len(body) + 1) for c in rcuts), len(body)]
    pieces = [bytearray(body[a:b]) if i % 2 else body[a:b] for i, (a, b) in enumerate(itertools.pairwise(rb))]
    r = SealReader(dek, header)
    got = []
    for p in pieces:
        got.append(r.update(p))
        assert r.buffered <= chunk_size + TAG
    got.append(r.finalize())
    assert b"".join(got) == pt
    assert b"".join(open_stream(dek, header, pieces)) == pt


def test_64mib_streaming_bounded_memory() -> None:
    """64 MiB through writer and reader in odd-sized pieces; memory stays ~chunks."""
    dek = os.urandom(32)
    header = make_header(chunk_size=sf.DEFAULT_CHUNK_SIZE)
    total, piece = 64 * 1024 * 1024, 100_003
    rng = random.Random(64)
    h_in, h_out = hashlib.sha256(), hashlib.sha256()

    def sealed_pieces() -> Iterator[bytes]:
        w = SealWriter(dek, header)
        left = total
        while left:
            p = rng.randbytes(min(piece, left))
            left -= len(p)
            h_in.update(p)
            yield from w.update_chunks(p)
            assert w.buffered <= header.chunk_size
        yield w.finalize()

    tracemalloc.start()
    try:
        n = 0
        for pt in open_stream(dek, header, sealed_pieces()):
            h_out.update(pt)
            n += len(pt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == total
    assert h_in.digest() == h_out.digest()
    assert peak < 4 * 1024 * 1024, peak  # vs 64 MiB of data


MIB = 1024 * 1024
_PATTERN = random.Random(2026).randbytes(1_000_003)  # prime length: no alignment with chunks


def _plain(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of a deterministic plaintext of any size, in O(length)."""
    start = offset % len(_PATTERN)
    reps = (start + length) // len(_PATTERN) + 1
    return (_PATTERN * reps)[start : start + length] if reps > 1 else _PATTERN[start : start + length]


def _sizes(chunk_sizes: tuple[int, ...]) -> st.SearchStrategy[tuple[int, int]]:
    """(size, chunk size) over 0 B to 64 MiB, half of them within a byte of a chunk boundary."""
    chunk = st.sampled_from(chunk_sizes)
    anywhere = st.tuples(st.integers(0, 64 * MIB), chunk)
    boundary = chunk.flatmap(
        lambda cs: st.tuples(
            st.builds(
                lambda k, d: min(64 * MIB, max(0, k * cs + d)), st.integers(0, 64 * MIB // cs), st.integers(-1, 1)
            ),
            st.just(cs),
        )
    )
    return st.one_of(anywhere, boundary)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sized=_sizes((sf.DEFAULT_CHUNK_SIZE, 65536, 1 * MIB)),
    piece=st.integers(1, 3 * MIB),
    at=st.integers(0, 2**32),
    span=st.integers(0, 2**32),
    flip=st.integers(0, 2**32),
    mask=st.integers(1, 255),
)
# Hypothesis starts small; the top of the range and its chunk boundaries always run.
@example(sized=(64 * MIB, sf.DEFAULT_CHUNK_SIZE), piece=100_003, at=7, span=2**31, flip=2**31, mask=1)
@example(sized=(64 * MIB - 1, 65536), piece=3 * MIB, at=2**32, span=2**32, flip=2**32, mask=128)
@example(sized=(0, 65536), piece=1, at=0, span=0, flip=0, mask=255)
def test_objects_of_any_size_up_to_64mib_stream_range_and_detect_a_flipped_byte(
    sized: tuple[int, int], piece: int, at: int, span: int, flip: int, mask: int
) -> None:
    """The issue's property range: sealed to a file and opened again by streaming, in bounded
    memory; any byte range reads back exactly; one flipped byte anywhere fails."""
    size, chunk_size = sized
    dek, header = os.urandom(32), make_header(chunk_size=chunk_size)
    with tempfile.TemporaryFile() as f:
        w = SealWriter(dek, header)
        f.write(w.header_bytes())
        for start in range(0, size, piece):
            for sealed in w.update_chunks(_plain(start, min(piece, size - start))):
                f.write(sealed)
            assert w.buffered <= chunk_size
        f.write(w.finalize())
        f.flush()

        f.seek(0)
        got_header, header_len = read_header(f)
        digest, n = hashlib.sha256(), 0
        for plain in open_stream(dek, got_header, iter(lambda: f.read(piece), b"")):
            digest.update(plain)
            n += len(plain)
        assert n == size
        assert digest.digest() == hashlib.sha256(_plain(0, size)).digest()

        offset = at % (size + 1)
        length = span % (min(size - offset, 2 * chunk_size + 3) + 1)
        assert b"".join(sf.iter_range(dek, got_header, header_len, f, offset, length)) == _plain(offset, length)

        file_size = f.seek(0, io.SEEK_END)
        pos = header_len + flip % (file_size - header_len)
        f.seek(pos)
        original = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([original ^ mask]))
        f.flush()
        f.seek(header_len)
        with pytest.raises(SealedObjectCorrupt):
            for _ in open_stream(dek, got_header, iter(lambda: f.read(piece), b"")):
                pass


# ---------------------------------------------------------------- tampering


def _immutable_end(header: SealedHeader) -> int:
    enc = header.encode()
    return len(enc) - len(header._key_fields())


@FAST
@given(data=st.data())
def test_flip_any_immutable_header_byte_fails(data: st.DataObject) -> None:
    pt = data_of(3 * CS + 100)
    dek, blob, _ = seal(pt)
    end = _immutable_end(SealedHeader.decode(blob)[0])
    pos = data.draw(st.integers(0, end - 1), label="pos")
    mask = data.draw(st.integers(1, 255), label="mask")
    bad = bytearray(blob)
    bad[pos] ^= mask
    expected = UnsupportedFormatVersion if pos == 8 else SealedObjectCorrupt
    with pytest.raises(expected):
        open_bytes(dek, bytes(bad))
    with pytest.raises(expected):
        open_all(dek, bytes(bad))


@FAST
@given(data=st.data())
def test_flip_any_ciphertext_byte_fails(data: st.DataObject) -> None:
    pt = data_of(3 * CS + 100)
    dek, blob, hl = seal(pt)
    pos = data.draw(st.integers(hl, len(blob) - 1), label="pos")
    bad = bytearray(blob)
    bad[pos] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, bytes(bad))
    with pytest.raises(SealedObjectCorrupt):
        open_all(dek, bytes(bad))


def test_key_fields_are_not_authenticated_by_design() -> None:
    """Key name/version/wrapped DEK may change (rewrap) without touching chunks."""
    pt = data_of(CS + 1)
    dek, blob, hl = seal(pt)
    h = SealedHeader.decode(blob)[0]
    other = h.with_key("other-key", 9, "vault:v9:Zm9v").encode() + blob[hl:]
    assert open_bytes(dek, other)[1] == pt


@pytest.mark.parametrize("drop_chunks", [1, 2, 3])
def test_truncation_at_chunk_boundary_fails(drop_chunks: int) -> None:
    pt = data_of(3 * CS + 100)
    dek, blob, hl = seal(pt)
    assert len(chunks_of(blob, hl)) == 4
    cut = blob[: len(blob) - 100 - TAG - (drop_chunks - 1) * SEG]
    assert (len(cut) - hl) % SEG == 0
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, cut)
    # The streaming reader yields earlier verified chunks first, then raises at the end.
    f = io.BytesIO(cut)
    header, _ = read_header(f)
    got: list[bytes] = []
    with pytest.raises(SealedObjectCorrupt):
        got.extend(open_stream(dek, header, f))
    assert b"".join(got) == pt[: len(got) * CS]
    assert len(got) == 3 - drop_chunks


def test_drop_final_chunk_of_exact_multiple_fails() -> None:
    pt = data_of(2 * CS)
    dek, blob, _ = seal(pt)
    with pytest.raises(SealedObjectCorrupt, match="final chunk 0"):
        open_bytes(dek, blob[:-SEG])


def test_empty_body_fails() -> None:
    dek, blob, hl = seal(b"")
    assert len(blob) == hl + TAG
    assert open_bytes(dek, blob)[1] == b""
    with pytest.raises(SealedObjectCorrupt, match="missing chunks"):
        open_bytes(dek, blob[:hl])


@FAST
@given(cut=st.integers(1, 3 * SEG + 100 + TAG - 1))
def test_truncation_anywhere_fails(cut: int) -> None:
    pt = data_of(3 * CS + 100)
    dek, blob, hl = seal(pt)
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, blob[: hl + cut])
    with pytest.raises(SealedObjectCorrupt):
        open_all(dek, blob[: hl + cut])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: [c[1], c[0], *c[2:]],  # reorder
        lambda c: [c[0], c[2], c[1], c[3]],  # reorder
        lambda c: [c[0], c[1], c[1], c[2], c[3]],  # duplicate
        lambda c: [c[0], c[0], c[1], c[2], c[3]],  # duplicate
        lambda c: [c[0], c[2], c[3]],  # drop middle
        lambda c: [*c, c[3]],  # duplicate final
        lambda c: [*c, b"\x00"],  # trailing byte
        lambda c: [*c, c[0]],  # trailing chunk
        # last byte replaced by a different one (a fixed value would equal it 1 time in 256)
        lambda c: [c[0], c[1], c[2], c[3][:-1], bytes([c[3][-1] ^ 0xFF])],
        lambda c: [c[0], c[1], c[3], c[2]],  # swap final and previous
    ],
)
def test_reorder_duplicate_and_trailing_data_fail(mutate: Callable[[list[bytes]], list[bytes]]) -> None:
    pt = data_of(3 * CS + 100)
    dek, blob, hl = seal(pt)
    chunks = chunks_of(blob, hl)
    bad = blob[:hl] + b"".join(mutate(chunks))
    assert bad != blob
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, bad)
    with pytest.raises(SealedObjectCorrupt):
        open_all(dek, bad)


def test_swapping_wrapped_dek_between_objects_fails() -> None:
    pt_a, pt_b = data_of(2 * CS + 5, 1), data_of(2 * CS + 5, 2)
    dek_a, blob_a, hl_a = seal(pt_a)
    dek_b, blob_b, _ = seal(pt_b, make_header(wrapped_dek="vault:v3:T1RIRVI=", object_id="b"))
    ha, hb = SealedHeader.decode(blob_a)[0], SealedHeader.decode(blob_b)[0]
    # A's chunks under B's key fields: unwrapping yields DEK_B, which cannot open A.
    swapped = ha.with_key(hb.key_name, hb.key_version, hb.wrapped_dek).encode() + blob_a[hl_a:]
    assert SealedHeader.decode(swapped)[0].wrapped_dek == hb.wrapped_dek
    with pytest.raises(SealedObjectCorrupt, match="chunk 0"):
        open_bytes(dek_b, swapped)
    assert open_bytes(dek_a, blob_a)[1] == pt_a


@pytest.mark.parametrize(
    "change",
    [
        {"sop_instance_uid": "1.2.826.0.1.3680043.8.498.9"},
        {"study_instance_uid": "1.2.826.0.1.3680043.8.498.9"},
        {"object_id": "obj/2024/Ω-002"},
        {"nonce_prefix": b"\x00" * 7},
        {"chunk_size": 8192},
    ],
)
def test_rewriting_immutable_header_field_fails(change: dict[str, object]) -> None:
    pt = data_of(2 * CS + 5)
    dek, blob, hl = seal(pt)
    h = SealedHeader.decode(blob)[0]
    forged = replace(h, **change).encode() + blob[hl:]  # type: ignore[arg-type]
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, forged)


def test_splicing_between_objects_with_same_dek_fails() -> None:
    dek = os.urandom(32)
    pt_a, pt_b = data_of(3 * CS, 1), data_of(3 * CS, 2)
    h_a = make_header()
    h_b = replace(h_a, nonce_prefix=bytes(a ^ 1 for a in h_a.nonce_prefix))
    h_c = replace(h_a, object_id="another")  # same prefix, different binding
    _, blob_a, hl = seal(pt_a, h_a, dek)
    for h_other in (h_b, h_c):
        _, blob_o, hl_o = seal(pt_b, h_other, dek)
        ca, co = chunks_of(blob_a, hl), chunks_of(blob_o, hl_o)
        spliced = blob_a[:hl] + ca[0] + co[1] + ca[2]
        with pytest.raises(SealedObjectCorrupt, match="chunk 1"):
            open_bytes(dek, spliced)


def test_wrong_dek_and_bad_dek_length() -> None:
    dek, blob, _ = seal(data_of(10))
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(os.urandom(32), blob)
    for bad in (b"", dek[:16], dek + b"x"):
        with pytest.raises(ValueError, match="32 bytes"):
            open_bytes(bad, blob)


def test_error_messages_leak_no_key_or_data() -> None:
    pt = b"PATIENT^SECRET" * 1000
    dek, blob, _ = seal(pt)
    bad = bytearray(blob)
    bad[-1] ^= 1
    messages = []
    attempts: list[Callable[[], object]] = [
        lambda: open_bytes(dek, bytes(bad)),
        lambda: open_bytes(os.urandom(32), blob),
    ]
    for attempt in attempts:
        with pytest.raises(SealedObjectCorrupt) as ei:
            attempt()
        messages.append(str(ei.value) + repr(ei.value))
        assert ei.value.__cause__ is None and ei.value.__suppress_context__
    for msg in messages:
        assert dek.hex() not in msg and repr(dek) not in msg and "SECRET" not in msg
        assert "authentication" in msg


# ---------------------------------------------------------------- rewrap


def test_rewrap_keeps_chunks_identical() -> None:
    pt = data_of(5 * CS + 3)
    dek, blob, hl = seal(pt)
    new_wrapped = "vault:v10:" + SealedHeader.decode(blob)[0].wrapped_dek.removeprefix("vault:v3:")
    new_header = rewrap_header(blob[:hl], "dicom-objects", 10, new_wrapped)
    rewrapped = new_header + blob[hl:]
    h_new, hl_new = SealedHeader.decode(rewrapped)
    h_old = SealedHeader.decode(blob)[0]
    assert hl_new == len(new_header) == hl + 1  # v3 -> v10 is one byte longer
    assert (h_new.key_version, h_new.wrapped_dek) == (10, new_wrapped)
    assert replace(h_new, key_version=3, wrapped_dek=h_old.wrapped_dek) == h_old
    assert h_new.associated_data == h_old.associated_data
    assert rewrapped[hl_new:] == blob[hl:]
    assert open_bytes(dek, rewrapped)[1] == pt
    assert open_range(dek, h_new, hl_new, io.BytesIO(rewrapped), CS - 2, 7) == pt[CS - 2 : CS + 5]


def test_rewrap_rejects_non_header_input() -> None:
    _, blob, hl = seal(data_of(10))
    with pytest.raises(ValueError, match="exactly one header"):
        rewrap_header(blob, "k", 4, "vault:v4:AA")
    with pytest.raises(ValueError):
        rewrap_header(blob[:hl], "k", 5, "vault:v4:AA")  # inconsistent version
    with pytest.raises(SealedObjectCorrupt):
        rewrap_header(b"\x00" * hl, "k", 4, "vault:v4:AA")


# ---------------------------------------------------------------- random access


@FAST
@given(
    size=st.integers(0, 200_000),
    chunk_size=st.sampled_from([4096, 4100, 16384]),
    a=st.integers(0, 200_000),
    b=st.integers(0, 200_000),
    verify_end=st.booleans(),
)
def test_open_range_matches_slice(size: int, chunk_size: int, a: int, b: int, verify_end: bool) -> None:
    pt = data_of(size, size)
    header = make_header(chunk_size=chunk_size)
    dek, blob, hl = seal(pt, header)
    assert plaintext_length(header, hl, len(blob)) == size
    off = a % (size + 1)
    length = b % (size - off + 1)
    f = io.BytesIO(blob)
    assert open_range(dek, header, hl, f, off, length, verify_end=verify_end) == pt[off : off + length]


def test_open_range_reads_only_needed_chunks() -> None:
    pt = data_of(10 * CS)
    header = make_header()
    dek, blob, hl = seal(pt, header)

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size: int | None = -1, /) -> bytes:
            out = super().read(size)
            self.read_bytes += len(out)
            return out

    f = Counting(blob)
    assert open_range(dek, header, hl, f, 3 * CS + 10, CS, verify_end=False) == pt[3 * CS + 10 : 4 * CS + 10]
    assert f.read_bytes == 2 * SEG
    f = Counting(blob)
    assert open_range(dek, header, hl, f, 3 * CS + 10, CS) == pt[3 * CS + 10 : 4 * CS + 10]
    assert f.read_bytes == 3 * SEG  # plus the final chunk


@FAST
@given(data=st.data())
def test_open_range_detects_tampering_inside_range(data: st.DataObject) -> None:
    pt = data_of(8 * CS + 123)
    header = make_header()
    dek, blob, hl = seal(pt, header)
    off = data.draw(st.integers(0, len(pt) - 1), label="off")
    length = data.draw(st.integers(1, len(pt) - off), label="length")
    first, last = off // CS, (off + length - 1) // CS
    pos = data.draw(st.integers(hl + first * SEG, min(len(blob), hl + (last + 1) * SEG) - 1), label="pos")
    bad = bytearray(blob)
    bad[pos] ^= 0x80
    with pytest.raises(SealedObjectCorrupt):
        open_range(dek, header, hl, io.BytesIO(bytes(bad)), off, length, verify_end=False)


def test_open_range_guarantees_outside_range() -> None:
    pt = data_of(8 * CS + 123)
    header = make_header()
    dek, blob, hl = seal(pt, header)
    # A tampered chunk outside the range is not read, so not detected (documented).
    bad = bytearray(blob)
    bad[hl + 6 * SEG + 5] ^= 1
    assert open_range(dek, header, hl, io.BytesIO(bytes(bad)), 0, 10) == pt[:10]
    # ... but a tampered final chunk is, with verify_end.
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(SealedObjectCorrupt, match="final chunk 8"):
        open_range(dek, header, hl, io.BytesIO(bytes(bad)), 0, 10)
    assert open_range(dek, header, hl, io.BytesIO(bytes(bad)), 0, 10, verify_end=False) == pt[:10]


def test_open_range_detects_truncation() -> None:
    pt = data_of(8 * CS + 123)
    header = make_header()
    dek, blob, hl = seal(pt, header)
    truncated = io.BytesIO(blob[: hl + 5 * SEG])  # cut at a chunk boundary
    assert plaintext_length(header, hl, len(truncated.getvalue())) == 5 * CS  # size alone is not proof
    with pytest.raises(SealedObjectCorrupt, match="final chunk 4"):
        open_range(dek, header, hl, truncated, 0, 10)  # verify_end catches it
    with pytest.raises(SealedObjectCorrupt, match="final chunk 4"):
        open_range(dek, header, hl, truncated, 4 * CS, 10, verify_end=False)  # range touches last chunk
    with pytest.raises(SealedObjectCorrupt, match="final chunk 4"):
        open_range(dek, header, hl, truncated, 6 * CS, 10, verify_end=False)  # claimed range past real end
    # Documented limit: without verify_end, a range away from the cut is served.
    assert open_range(dek, header, hl, truncated, 0, 10, verify_end=False) == pt[:10]
    with pytest.raises(SealedObjectCorrupt):
        open_range(dek, header, hl, io.BytesIO(blob[: hl + 5 * SEG + 7]), 0, 10)  # mid-tag cut


def test_open_range_bounds() -> None:
    pt = data_of(3 * CS)
    header = make_header()
    dek, blob, hl = seal(pt, header)
    f = io.BytesIO(blob)
    with pytest.raises(SealedRangeError):
        open_range(dek, header, hl, f, 3 * CS - 1, 2)
    with pytest.raises(SealedRangeError):
        open_range(dek, header, hl, f, 3 * CS + 1, 0)
    assert open_range(dek, header, hl, f, 3 * CS, 0) == b""
    assert open_range(dek, header, hl, f, 0, 3 * CS) == pt
    with pytest.raises(ValueError):
        open_range(dek, header, hl, f, -1, 1)
    with pytest.raises(SealedObjectCorrupt):
        open_range(os.urandom(32), header, hl, f, 0, 0)  # verify_end checks the key too


def test_non_canonical_empty_final_chunk_rejected() -> None:
    """A final empty chunk after full chunks is never written; readers refuse it."""
    dek = os.urandom(32)
    header = make_header()
    pt = data_of(CS)
    aead = AESGCM(dek)
    ad, p = header.associated_data, header.nonce_prefix
    blob = (
        header.encode()
        + aead.encrypt(p + b"\x00\x00\x00\x00\x00", pt, ad)
        + aead.encrypt(p + b"\x00\x00\x00\x01\x01", b"", ad)
    )
    with pytest.raises(SealedObjectCorrupt, match="non-canonical"):
        open_bytes(dek, blob)
    with pytest.raises(SealedObjectCorrupt, match="non-canonical"):
        plaintext_length(header, len(header.encode()), len(blob))


# ---------------------------------------------------------------- limits


def test_chunk_index_overflow_is_refused() -> None:
    dek = os.urandom(32)
    header = make_header()
    w = SealWriter(dek, header)
    w._index = MAX_CHUNK_INDEX  # as if 2**32-1 chunks had been written
    with pytest.raises(SealedFormatError, match="overflow"):
        w.update(b"x" * (CS + 1))  # would need a non-final chunk at the last index
    w2 = SealWriter(dek, header)
    w2._index = MAX_CHUNK_INDEX
    w2.update(b"x" * CS)
    last = w2.finalize()  # the final chunk may use the last index
    assert len(last) == SEG
    r = SealReader(dek, header)
    r._index = MAX_CHUNK_INDEX
    assert r.update(last) == b""
    assert r.finalize() == b"x" * CS
    r2 = SealReader(dek, header)
    r2._index = MAX_CHUNK_INDEX
    with pytest.raises(SealedObjectCorrupt, match="more chunks"):
        r2.update(last + b"y")  # a non-final chunk at the last index is impossible


def test_erasure_key_ref_is_bound_to_the_chunks() -> None:
    dek = os.urandom(32)
    h = make_header(erasure_key_ref="ab" * 16)
    sealed = seal_bytes(dek, h, b"x" * 10_000)
    decoded, _ = SealedHeader.decode(sealed)
    assert decoded.erasure_key_ref == "ab" * 16
    swapped = replace(h, erasure_key_ref="cd" * 16).encode() + sealed[len(h.encode()) :]
    with pytest.raises(SealedObjectCorrupt):
        open_bytes(dek, swapped)
    with pytest.raises(ValueError):
        make_header(erasure_key_ref="NOT-HEX")


def test_iter_range_yields_one_chunk_at_a_time_and_checks_the_end_first() -> None:
    pt = data_of(8 * CS + 123)
    header = make_header()
    dek, blob, hl = seal(pt, header)
    pieces = list(sf.iter_range(dek, header, hl, io.BytesIO(blob), CS + 7, 3 * CS))
    assert [len(p) for p in pieces] == [CS - 7, CS, CS, 7]
    assert b"".join(pieces) == pt[CS + 7 : 4 * CS + 7]
    # A tampered final chunk stops the range before its first byte is released.
    bad = bytearray(blob)
    bad[-1] ^= 1
    released = sf.iter_range(dek, header, hl, io.BytesIO(bytes(bad)), 0, 3 * CS)
    with pytest.raises(SealedObjectCorrupt, match="final chunk 8"):
        next(released)


def test_iter_range_memory_does_not_grow_with_the_range() -> None:
    cs = 64 * 1024
    pt = os.urandom(16 * 1024 * 1024)
    header = make_header(chunk_size=cs)
    dek, blob, hl = seal(pt, header)
    f = io.BytesIO(blob)
    tracemalloc.start()
    try:
        seen = 0
        for piece in sf.iter_range(dek, header, hl, f, 5, len(pt) - 10):
            seen += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == len(pt) - 10
    assert peak < 8 * cs  # a few chunks, not the 16 MiB range


def test_a_range_reaching_the_last_stored_chunk_yields_nothing_from_a_truncated_object() -> None:
    """Truncated at a chunk boundary, the last stored chunk is not the final one: a range that
    ends in it must fail before its earlier chunks are handed out."""
    dek, blob, hl = seal(data_of(5 * CS + 100), make_header())
    cut = blob[: hl + 4 * SEG]  # chunks 0..3 kept, 4 and the final one gone
    header, _ = read_header(io.BytesIO(cut))
    pieces = sf.iter_range(dek, header, hl, io.BytesIO(cut), 2 * CS + 5, 2 * CS - 5)
    with pytest.raises(SealedObjectCorrupt):
        next(pieces)
