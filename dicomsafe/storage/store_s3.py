"""The S3 backend: sealed objects in a bucket (SeaweedFS, MinIO, Ceph RGW, AWS), via botocore.

botocore's client is synchronous and thread-safe; the crypto service already runs a seal's
writes on a worker thread and runs reads off its event loop when ``reads_block`` says so, so
an asynchronous client would add a second HTTP stack without adding parallelism.

- Put: the object is buffered up to one part (``part_size``); an object that fits is one
  PutObject, a larger one a multipart upload whose parts are sent (one at a time, in the
  background) while the stream still arrives, so a seal holds at most two parts. Either way
  S3 shows nothing under the key until PutObject or CompleteMultipartUpload succeeds, so an
  interrupted seal leaves no partial object, only an incomplete upload that
  ``remove_leftovers`` aborts later.
- First writer wins: the final request carries ``If-None-Match: *``; a second put of an id
  already stored gets 412 and uses the stored object (ids derive from the content). Rewrap's
  new header (``replace=True``) overwrites instead, and a versioned bucket keeps the old copy.
- Get: a seekable reader doing ranged GETs with read-ahead, pinned to the version (or ETag)
  seen at open, so a concurrent rewrap cannot splice two versions into one read.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError

from dicomsafe.storage.object_store import LEFTOVER_AGE_S, S3Settings, StoreConfigError, claim_key, relative_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("dicomsafe.crypto.store")

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part but the last
# Read-ahead of one GET: several 256 KiB chunks per round trip on a whole-object open, while
# an open of one frame still costs one GET.
READ_AHEAD = 4 * 1024 * 1024
CONTENT_TYPE = "application/vnd.dicomsafe.sealed"
_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{32,64})\.dso$")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def new_client(s3: S3Settings) -> S3Client:
    config = Config(
        signature_version="s3v4",
        # Path style for self-hosted endpoints (no wildcard DNS for bucket subdomains).
        s3={"addressing_style": "path" if s3.endpoint_url else "auto"},
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=32,
        connect_timeout=5,
        read_timeout=60,
    )
    session = botocore.session.get_session()
    client = session.create_client(
        "s3",
        region_name=s3.region,
        endpoint_url=s3.endpoint_url or None,
        aws_access_key_id=s3.access_key_id or None,
        aws_secret_access_key=s3.secret_access_key or None,
        verify=s3.ca_bundle or None,
        config=config,
    )
    return cast("S3Client", client)


@dataclass(frozen=True)
class Retention:
    """S3 Object Lock put on each object as it is written."""

    mode: str
    days: int

    def put_arguments(self) -> dict[str, Any]:
        until = dt.datetime.now(dt.UTC) + dt.timedelta(days=self.days)
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": until}


class S3Store:
    reads_block = True

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        *,
        part_size: int,
        leftover_age_s: float = LEFTOVER_AGE_S,
        retention: Retention | None = None,
    ) -> None:
        if not bucket:
            raise StoreConfigError("an s3:// store URL needs a bucket (s3://bucket/prefix)")
        if part_size < MIN_PART_SIZE:
            raise StoreConfigError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self._client = client
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        self.leftover_age_s = leftover_age_s
        self.retention = retention
        # Shared by every seal in flight; botocore's connection pool (32) is larger.
        self._uploads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-part")

    @classmethod
    def connect(
        cls, bucket: str, prefix: str, s3: S3Settings, *, part_size: int, retention: Retention | None = None
    ) -> S3Store:
        store = cls(new_client(s3), bucket, prefix, part_size=part_size, retention=retention)
        store.ensure_bucket()
        return store

    def describe_location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key_of(self, object_id: str) -> str:
        return self.prefix + relative_key(object_id)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing and turn versioning on where the server supports it."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) != 404:
                raise
            try:
                region = self._client.meta.region_name
                lock: dict[str, Any] = {"ObjectLockEnabledForBucket": True} if self.retention else {}
                if region and region != "us-east-1":
                    self._client.create_bucket(
                        Bucket=self.bucket,
                        CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                        **lock,
                    )
                else:
                    self._client.create_bucket(Bucket=self.bucket, **lock)
                log.info("bucket created", extra={"bucket": self.bucket})
            except ClientError as race:
                # Two replicas starting together: the other one created it.
                if _code(race) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        status = self._client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        if status != "Enabled":
            try:
                self._client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
            except ClientError as exc:
                # A bucket managed elsewhere (or a server without versioning) still stores.
                log.warning("bucket versioning not enabled", extra={"bucket": self.bucket, "error": _code(exc)})
        if self.retention:
            self._require_object_lock()

    def _require_object_lock(self) -> None:
        try:
            config = self._client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except ClientError:
            enabled = False
        if not enabled:
            raise StoreConfigError(
                f"bucket {self.bucket} has no Object Lock: retention needs a bucket created with it enabled"
            )

    def exists(self, object_id: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self.key_of(object_id))
        except ClientError as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def open_read(self, object_id: str) -> BinaryIO:
        key = self.key_of(object_id)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(object_id) from exc
            raise
        version = head.get("VersionId")
        pin: dict[str, Any] = {"VersionId": version} if version and version != "null" else {"IfMatch": head["ETag"]}
        raw = _RangeReader(self._client, self.bucket, key, int(head["ContentLength"]), pin)
        return io.BufferedReader(raw, buffer_size=READ_AHEAD)

    def claim(self, sop_instance_uid: str, object_id: str) -> str:
        key = self.prefix + claim_key(sop_instance_uid)
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=object_id.encode("ascii"), ContentType="text/plain", IfNoneMatch="*"
            )
        except ClientError as exc:
            if _status(exc) not in (409, 412):
                raise
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode("ascii").strip()
        return object_id

    def begin_write(self, object_id: str, *, replace: bool = False) -> S3Pending:
        lock = self.retention.put_arguments() if self.retention else {}
        return S3Pending(
            self._client, self.bucket, self.key_of(object_id), self.part_size, replace, self._uploads, lock
        )

    def remove(self, object_id: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.key_of(object_id))

    def object_ids(self) -> Iterator[str]:
        # ListObjectsV2 returns keys in UTF-8 binary order: the id order, stable across runs.
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                m = _KEY.match(item["Key"][len(self.prefix) :])
                if m:
                    yield m.group(1)

    def incomplete_uploads(self) -> list[tuple[str, str, float]]:
        """(key, upload id, age in seconds) of multipart uploads never completed."""
        found = []
        now = time.time()
        pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for up in page.get("Uploads", []):
                found.append((up["Key"], up["UploadId"], now - up["Initiated"].timestamp()))
        return found

    def remove_leftovers(self) -> int:
        removed = 0
        for key, upload_id, age in self.incomplete_uploads():
            if age >= self.leftover_age_s:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                removed += 1
        return removed


class S3Pending:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        part_size: int,
        replace: bool,
        uploads: Executor,
        lock: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self._lock = lock or {}
        self._uploads = uploads
        # One part uploading while the next one fills: encryption and the network overlap,
        # and a seal holds at most two parts.
        self._in_flight: Future[None] | None = None
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._replace = replace
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._finished = False
        self.size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= self._part_size:
            part = bytes(self._buf[: self._part_size])
            del self._buf[: self._part_size]
            self._settle_in_flight()
            self._in_flight = self._uploads.submit(self._upload_part, part)

    def _settle_in_flight(self, *, ignore_errors: bool = False) -> None:
        work, self._in_flight = self._in_flight, None
        if work is None:
            return
        if ignore_errors:
            futures.wait([work])
        else:
            work.result()  # a failed part fails the seal here

    def _upload_part(self, body: bytes) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._key, ContentType=CONTENT_TYPE, **self._lock
            )
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def sync_data(self) -> None:
        """Nothing to do: every uploaded part is already durable on the server."""

    def commit(self) -> bool:
        cond: dict[str, Any] = {} if self._replace else {"IfNoneMatch": "*"}
        try:
            # First: the part in flight may be the one that starts the multipart upload.
            self._settle_in_flight()
            if self._upload_id is None:
                self._client.put_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Body=bytes(self._buf),
                    ContentType=CONTENT_TYPE,
                    **cond,
                    **self._lock,
                )
            else:
                if self._buf:
                    self._upload_part(bytes(self._buf))
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
                    **cond,
                )
        except ClientError as exc:
            if _status(exc) == 412 and not self._replace:
                self.abort()
                return False
            raise
        self._finished = True
        self._buf = bytearray()
        return True

    def abort(self) -> None:
        self._buf = bytearray()
        self._settle_in_flight(ignore_errors=True)
        if self._upload_id is not None and not self._finished:
            self._finished = True
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            except ClientError as exc:
                # Left for remove_leftovers; never visible as an object either way.
                log.warning("multipart upload not aborted", extra={"key": self._key, "error": _code(exc)})


class _RangeReader(io.RawIOBase):
    def __init__(self, client: S3Client, bucket: str, key: str, size: int, pin: dict[str, Any]) -> None:
        super().__init__()
        self._client = client
        self._bucket = bucket
        self._key = key
        self._size = size
        self._pin = pin
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        end = min(self._pos + len(view), self._size)
        try:
            resp = self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{end - 1}", **self._pin
            )
        except ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(self._key) from exc
            if _status(exc) == 412:
                raise OSError(f"{self._key} changed while it was read") from exc
            raise
        body = resp["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        if len(data) != end - self._pos:
            raise OSError(f"{self._key}: short ranged read ({len(data)} of {end - self._pos} bytes)")
        view[: len(data)] = data
        self._pos = end
        return len(data)
