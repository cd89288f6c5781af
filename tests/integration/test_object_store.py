"""The object store's promises, checked on both backends: a directory and a real S3 server
(SeaweedFS locally, or whatever S3 the environment names)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from dicomsafe.storage.object_store import ObjectStore, StoreConfigError, StoreSettings, open_store, rewrite_header
from dicomsafe.storage.store_fs import FileStore
from dicomsafe.storage.store_s3 import S3Store, new_client
from tests.servers import Servers
from tests.service_runner import TEST_BUCKET, TEST_PART_SIZE, s3_settings

MIB = 1024 * 1024


def _id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def _put(store: ObjectStore, object_id: str, data: bytes, piece: int = 1 * MIB + 7) -> bool:
    pending = store.begin_write(object_id)
    try:
        for i in range(0, len(data), piece):
            pending.write(data[i : i + piece])
        assert pending.size == len(data)
        return pending.commit()
    except BaseException:
        pending.abort()
        raise


def _get(store: ObjectStore, object_id: str, offset: int = 0, length: int = -1) -> bytes:
    with store.open_read(object_id) as f:
        f.seek(offset)
        return f.read(length)


def _leftovers(store: ObjectStore) -> int:
    if isinstance(store, S3Store):
        return len(store.incomplete_uploads())
    assert isinstance(store, FileStore)
    return len(store.leftover_temp_files())


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, servers: Servers, unique: str) -> Iterator[ObjectStore]:
    if request.param == "file":
        yield FileStore(tmp_path / "store", leftover_age_s=0)
        return
    # Leftover age 0: this test's own interrupted uploads count as leftovers at once.
    s3 = S3Store(
        new_client(s3_settings(servers.s3)), TEST_BUCKET, f"t{unique}", part_size=TEST_PART_SIZE, leftover_age_s=0
    )
    s3.ensure_bucket()
    yield s3


def test_put_get_range_exists_and_listing(store: ObjectStore) -> None:
    oid, other = _id("a"), _id("b")
    data = os.urandom(300_001)
    assert not store.exists(oid)
    with pytest.raises(FileNotFoundError):
        store.open_read(oid)
    assert _put(store, oid, data)
    assert _put(store, other, b"x" * 10)
    assert store.exists(oid)
    assert _get(store, oid) == data
    assert _get(store, oid, 12_345, 100_000) == data[12_345:112_345]
    assert _get(store, oid, len(data) - 5, 100) == data[-5:]
    assert _get(store, oid, len(data) + 10, 10) == b""
    with store.open_read(oid) as f:
        assert f.seek(0, os.SEEK_END) == len(data)
        f.seek(-3, os.SEEK_END)
        assert f.read() == data[-3:]
    assert list(store.object_ids()) == sorted([oid, other])
    assert _leftovers(store) == 0


def test_large_object_goes_up_in_parts_and_reads_back_across_part_boundaries(store: ObjectStore) -> None:
    oid = _id("large")
    data = os.urandom(20 * MIB + 123)
    pending = store.begin_write(oid)
    for i in range(0, len(data), MIB + 7):
        pending.write(data[i : i + MIB + 7])
    # Most of it is already on the server (S3: four parts uploaded), none of it visible.
    assert not store.exists(oid)
    assert oid not in list(store.object_ids())
    if isinstance(store, S3Store):
        assert len(store.incomplete_uploads()) == 1
    assert pending.commit()
    assert hashlib.sha256(_get(store, oid)).digest() == hashlib.sha256(data).digest()
    for boundary in (TEST_PART_SIZE, 2 * TEST_PART_SIZE, 4 * TEST_PART_SIZE):
        assert _get(store, oid, boundary - 10, 20) == data[boundary - 10 : boundary + 10]
    assert _leftovers(store) == 0


@pytest.mark.parametrize("extra", [0, 1, 100_000])
def test_commit_right_after_the_first_full_part(store: ObjectStore, extra: int) -> None:
    # The first part is still uploading (and starting the multipart upload) when commit comes.
    oid = _id(f"one-part-{extra}")
    data = os.urandom(TEST_PART_SIZE + extra)
    pending = store.begin_write(oid)
    pending.write(data)
    assert pending.commit()
    assert _get(store, oid) == data
    assert _leftovers(store) == 0


def test_interrupted_puts_never_show_a_partial_object(store: ObjectStore) -> None:
    for size in (0, 1, 4096, TEST_PART_SIZE - 1, TEST_PART_SIZE, 2 * TEST_PART_SIZE + 17):
        oid = _id(f"crash-{size}")
        pending = store.begin_write(oid)
        pending.write(os.urandom(size))
        pending.sync_data()
        # The writer "crashes" here: no commit, no abort.
        assert not store.exists(oid), size
        with pytest.raises(FileNotFoundError):
            store.open_read(oid)
        assert oid not in list(store.object_ids())
    aborted = store.begin_write(_id("aborted"))
    aborted.write(os.urandom(TEST_PART_SIZE + 1))
    aborted.abort()
    assert not store.exists(_id("aborted"))
    assert list(store.object_ids()) == []
    # What the crashed writers left is cleaned up at the next start, and never became objects.
    assert store.remove_leftovers() >= 1
    assert _leftovers(store) == 0
    assert list(store.object_ids()) == []


def test_concurrent_puts_of_one_id_leave_one_whole_object(store: ObjectStore) -> None:
    oid = _id("contended")
    # Different bytes per writer (a fresh data key each in the service), small and multipart.
    contents = [os.urandom(n) for n in (70_000, 70_000, TEST_PART_SIZE + 3, 2 * TEST_PART_SIZE)]
    ready = threading.Barrier(len(contents))
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            pending = store.begin_write(oid)
            pending.write(contents[i])
            ready.wait()
            results[i] = pending.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(contents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = _get(store, oid)
    winners = [contents[i] for i, won in results.items() if won]
    assert winners, results
    # Not "exactly one winner": SeaweedFS checks If-None-Match before it writes, not
    # atomically with it (AWS does), so racing writers may all be told they stored. What must
    # hold everywhere: the object is one winner's bytes, whole.
    assert stored in winners
    assert list(store.object_ids()) == [oid]
    assert _leftovers(store) == 0


def test_a_reader_keeps_the_version_it_opened_while_the_object_is_replaced(store: ObjectStore) -> None:
    oid = _id("replaced")
    old = os.urandom(3 * MIB)
    assert _put(store, oid, old)
    with store.open_read(oid) as f:
        head = f.read(1000)
        rewrite_header(store, oid, b"NEW-HEADER", 1000)
        f.seek(2 * MIB)
        tail = f.read()
    assert head + tail == old[:1000] + old[2 * MIB :]
    assert _get(store, oid) == b"NEW-HEADER" + old[1000:]


def test_second_put_of_a_stored_id_is_harmless(store: ObjectStore) -> None:
    oid = _id("again")
    first = os.urandom(1000)
    assert _put(store, oid, first)
    again = _put(store, oid, os.urandom(1000))
    if isinstance(store, S3Store):
        assert not again
        assert _get(store, oid) == first
    else:
        assert again  # rename replaces: a whole object either way
    assert list(store.object_ids()) == [oid]
    assert _leftovers(store) == 0


def test_s3_bucket_is_versioned(servers: Servers, unique: str) -> None:
    client = new_client(s3_settings(servers.s3))
    store = S3Store(client, f"dicomsafe-v{unique}", "", part_size=TEST_PART_SIZE)
    store.ensure_bucket()
    store.ensure_bucket()  # a second replica starting: nothing to do, no error
    assert client.get_bucket_versioning(Bucket=store.bucket).get("Status") == "Enabled"


def test_first_claim_of_a_sop_instance_uid_wins(store: ObjectStore, unique: str) -> None:
    first, second = _id("claim-a" + unique), _id("claim-b" + unique)
    uid = f"1.2.826.0.1.3680043.10.{int(unique, 16)}"
    assert store.claim(uid, first) == first
    # The same object again (a redelivery) finds its own claim; another object finds the first.
    assert store.claim(uid, first) == first
    assert store.claim(uid, second) == first
    assert store.claim(uid + ".1", second) == second
    # Claims are no objects: a listing of the store shows none of them.
    assert first not in set(store.object_ids()) and second not in set(store.object_ids())
    assert _leftovers(store) == 0


def test_concurrent_claims_leave_one_holder(store: ObjectStore, unique: str) -> None:
    uid = f"1.2.826.0.1.3680043.11.{int(unique, 16)}"
    ids = [_id(f"racer-{n}-{unique}") for n in range(6)]
    results: list[str] = []
    lock = threading.Lock()

    def claim(object_id: str) -> None:
        holder = store.claim(uid, object_id)
        with lock:
            results.append(holder)

    threads = [threading.Thread(target=claim, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holder = store.claim(uid, _id("late" + unique))
    assert holder in ids
    if isinstance(store, FileStore):
        # link() is atomic: every racer was told the same holder. (SeaweedFS's conditional put is
        # not atomic, so there two racers may each be told they hold it: see the crypto README.)
        assert set(results) == {holder}


def test_archive_retention_locks_every_object_put(servers: Servers, unique: str) -> None:
    """Object Lock on an archive tier: each object, whole or multipart, is written retained, and
    not even its own writer can delete that version before the date."""
    settings = StoreSettings(
        f"s3://dicomsafe-archive-{unique}/objects", s3_settings(servers.s3), TEST_PART_SIZE, retention_days=30
    )
    store = open_store(settings)
    assert isinstance(store, S3Store)
    client = new_client(s3_settings(servers.s3))
    for name, size in (("small", 1000), ("multipart", 2 * TEST_PART_SIZE + 5)):
        object_id = _id(f"locked-{name}")
        data = os.urandom(size)
        assert _put(store, object_id, data) and _get(store, object_id) == data
        head = client.head_object(Bucket=store.bucket, Key=store.key_of(object_id))
        assert head["ObjectLockMode"] == "COMPLIANCE"
        until = head["ObjectLockRetainUntilDate"]
        assert dt.timedelta(days=29) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
        with pytest.raises(ClientError):
            client.delete_object(Bucket=store.bucket, Key=store.key_of(object_id), VersionId=head["VersionId"])
        assert _get(store, object_id) == data
    # Retention asked of a bucket made without Object Lock (the test bucket): refused at start.
    with pytest.raises(StoreConfigError, match="Object Lock"):
        open_store(StoreSettings(f"s3://{TEST_BUCKET}/x{unique}", s3_settings(servers.s3), retention_days=30))
    with pytest.raises(StoreConfigError, match="s3://"):
        open_store(StoreSettings("file:///tmp/never", retention_days=1))
