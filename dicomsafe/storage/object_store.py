"""Where sealed objects live: one interface, two backends (a filesystem, an S3 bucket).

The store only ever sees sealed bytes (header with the wrapped DEK, then AES-GCM chunks):
never plaintext, never a key. Every backend keeps the same promises:

- a put streams with bounded memory, and nothing is visible under the object's id before
  ``commit`` (a crash or an aborted seal leaves no readable half object);
- a second put of an id already stored is harmless (ids derive from the content, and each
  sealed copy opens to the same plaintext);
- reads are seekable, so an open of one frame reads only the chunks that hold it;
- a SOP Instance UID is claimed by the first object sealed for it (``claim``), atomically, so
  two instances with one UID and different content never both become the stored instance.

``open_store`` picks the backend from ``CRYPTO_STORE_URL``: ``file:///path`` (or a bare path)
or ``s3://bucket/prefix``. The product does not delete sealed objects (erasure destroys the
patient's key instead); ``remove`` exists for one caller, the tiering job, which drops a hot
copy only after the archive tier holds the same bytes (``store_tiered``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

OBJECT_ID = re.compile(r"^[0-9a-f]{32,64}$")
SUFFIX = ".dso"
COPY_BLOCK = 1024 * 1024
# An unfinished put older than this cannot belong to a seal still running (4 GiB at a few MB/s),
# so a process starting up may drop it without racing other writers' live seals.
LEFTOVER_AGE_S = 6 * 3600.0


class InvalidObjectId(ValueError):
    pass


class StoreConfigError(ValueError):
    """The store URL or its settings cannot work."""


def validate_object_id(object_id: str) -> str:
    # Strict pattern: the id becomes a path or an object key, so nothing like "../" may pass.
    if not OBJECT_ID.match(object_id):
        raise InvalidObjectId("object id must be 32-64 lowercase hex characters")
    return object_id


def object_id_for(sop_instance_uid: str, content_sha256: str) -> str:
    """Same instance, same bytes → same object id: what makes redelivery idempotent."""
    return hashlib.sha256(f"{sop_instance_uid}\0{content_sha256}".encode()).hexdigest()


def relative_key(object_id: str) -> str:
    """``ab/cd/abcd….dso``: the same layout in a directory and under a bucket prefix, and a
    listing in key order is a listing in id order."""
    validate_object_id(object_id)
    return f"{object_id[:2]}/{object_id[2:4]}/{object_id}{SUFFIX}"


def claim_key(sop_instance_uid: str) -> str:
    """``claims/ab/cd/<hash>``: a SOP Instance UID's claim, named by a hash so that no UID is
    readable in a listing of the store."""
    digest = hashlib.sha256(b"dicomsafe sop claim\0" + sop_instance_uid.encode("ascii", "replace")).hexdigest()
    return f"claims/{digest[:2]}/{digest[2:4]}/{digest}"


class PendingObject(Protocol):
    """A sealed object being written; visible under its id only after ``commit``."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def sync_data(self) -> None:
        """Make what is written so far durable early; safe from a worker thread while writes continue."""

    def commit(self) -> bool:
        """Publish the object. False when another writer had already stored this id (the
        object there is used; ours is dropped)."""

    def abort(self) -> None: ...


class ObjectStore(Protocol):
    # True when reads go over the network: the service then reads off its event loop.
    reads_block: bool

    def describe_location(self) -> str:
        """Where the objects are, for logs (no credentials)."""

    def exists(self, object_id: str) -> bool: ...

    def claim(self, sop_instance_uid: str, object_id: str) -> str:
        """Record ``object_id`` as the object of ``sop_instance_uid`` unless one already is;
        returns the object id that holds the claim (ours when first)."""

    def open_read(self, object_id: str) -> BinaryIO:
        """A seekable reader of one stored version; FileNotFoundError if there is none."""

    def begin_write(self, object_id: str, *, replace: bool = False) -> PendingObject:
        """``replace``: overwrite an existing object (rewrap's new header), else first writer wins."""

    def object_ids(self) -> Iterator[str]:
        """Every stored object id, in a stable order (so a resumed job walks the same path)."""

    def remove_leftovers(self) -> int:
        """Drop what interrupted puts left behind (never visible as objects); how many."""


class TierStore(ObjectStore, Protocol):
    """One tier of a tiered store (both backends are): its copy of an object can be dropped."""

    def remove(self, object_id: str) -> None:
        """Drop this tier's copy (the tiering job only; a versioned bucket keeps the old version)."""


def rewrite_header(store: ObjectStore, object_id: str, new_header: bytes, old_header_len: int) -> int:
    """Replace an object's header, copying its chunks byte for byte; returns the new size."""
    pending = store.begin_write(object_id, replace=True)
    try:
        with store.open_read(object_id) as src:
            pending.write(new_header)
            src.seek(old_header_len)
            while block := src.read(COPY_BLOCK):
                pending.write(block)
        pending.commit()
    except BaseException:
        pending.abort()
        raise
    return pending.size


class CopyMismatch(ValueError):
    """The bytes copied are not the ones expected: nothing was published at the destination."""


def sha256_of(store: ObjectStore, object_id: str) -> str:
    """SHA-256 of one stored object's bytes, streamed."""
    digest = hashlib.sha256()
    with store.open_read(object_id) as f:
        while block := f.read(COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def copy_verified(src: ObjectStore, dst: ObjectStore, object_id: str, want_sha256: str) -> None:
    """Stream one sealed object from ``src`` to ``dst`` (replacing what ``dst`` holds), published
    there only if its bytes hash to ``want_sha256``: what backups and tiering move, byte for byte."""
    digest = hashlib.sha256()
    pending = dst.begin_write(object_id, replace=dst.exists(object_id))
    try:
        with src.open_read(object_id) as f:
            while block := f.read(COPY_BLOCK):
                digest.update(block)
                pending.write(block)
        if digest.hexdigest() != want_sha256:
            raise CopyMismatch(f"object {object_id} does not match its expected SHA-256")
        pending.commit()
    except BaseException:
        pending.abort()
        raise


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3 API. Empty endpoint = AWS; empty keys = botocore's default chain
    (e.g. a Kubernetes service account's web identity)."""

    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key_id: str | None = None
    # Kept out of repr: settings objects end up in logs and tracebacks.
    secret_access_key: str | None = field(default=None, repr=False)
    ca_bundle: str = ""


@dataclass(frozen=True)
class StoreSettings:
    url: str
    s3: S3Settings = S3Settings()
    # Multipart part size; a put holds at most two parts in memory. S3 wants >= 5 MiB parts.
    part_size: int = 16 * 1024 * 1024
    # S3 Object Lock on every object put (the archive tier): kept at least this many days,
    # undeletable by anyone (COMPLIANCE) or by those without the bypass right (GOVERNANCE).
    # 0 = none. Needs a bucket with Object Lock enabled (created so when missing).
    retention_days: int = 0
    retention_mode: str = "COMPLIANCE"

    @property
    def local_root(self) -> Path | None:
        """The directory of a filesystem store, None for S3."""
        scheme, rest = _split_url(self.url)
        return Path(rest) if scheme == "file" else None


def file_url(root: Path) -> str:
    return root.resolve().as_uri()


def _split_url(url: str) -> tuple[str, str]:
    if url.startswith("s3://"):
        return "s3", url[len("s3://") :]
    if url.startswith("file://"):
        path = url[len("file://") :]
        if not path.startswith("/"):
            raise StoreConfigError("a file:// store URL needs an absolute path (file:///var/store)")
        return "file", path
    if url.startswith("file:"):
        return "file", url[len("file:") :]
    if "://" in url:
        raise StoreConfigError(f"unsupported store URL scheme in {url.split('://', 1)[0]}:// (use file:// or s3://)")
    return "file", url


def open_store(settings: StoreSettings) -> TierStore:
    """The backend named by ``settings.url``, ready for use (an S3 bucket is created if missing)."""
    scheme, rest = _split_url(settings.url)
    if settings.retention_days < 0 or settings.retention_mode not in ("COMPLIANCE", "GOVERNANCE"):
        raise StoreConfigError("retention needs days >= 0 and mode COMPLIANCE or GOVERNANCE")
    if scheme == "file":
        if settings.retention_days:
            raise StoreConfigError("retention (Object Lock) needs an s3:// store")
        from dicomsafe.storage.store_fs import FileStore

        return FileStore(Path(rest))
    from dicomsafe.storage.store_s3 import Retention, S3Store

    bucket, _, prefix = rest.partition("/")
    retention = Retention(settings.retention_mode, settings.retention_days) if settings.retention_days else None
    return S3Store.connect(bucket, prefix, settings.s3, part_size=settings.part_size, retention=retention)
