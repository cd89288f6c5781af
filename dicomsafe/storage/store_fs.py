"""The filesystem backend: sealed objects as files (a local disk, or a volume in Kubernetes).

Writes go to a temporary file in the destination directory, are fsynced, then renamed,
so a crash or an aborted seal never leaves a readable half object under the final name.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dicomsafe.storage.object_store import LEFTOVER_AGE_S, SUFFIX, claim_key, relative_key


class FileStore:
    # Reads come from the page cache: cheaper on the event loop than a thread hand-off (measured).
    reads_block = False

    def __init__(self, root: Path, leftover_age_s: float = LEFTOVER_AGE_S) -> None:
        self.root = root
        self.leftover_age_s = leftover_age_s
        root.mkdir(parents=True, exist_ok=True)

    def describe_location(self) -> str:
        return f"file://{self.root.resolve()}"

    def path_of(self, object_id: str) -> Path:
        return self.root / relative_key(object_id)

    def exists(self, object_id: str) -> bool:
        return self.path_of(object_id).is_file()

    def open_read(self, object_id: str) -> BinaryIO:
        return self.path_of(object_id).open("rb")

    def claim(self, sop_instance_uid: str, object_id: str) -> str:
        path = self.root / claim_key(sop_instance_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, object_id.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails when the name exists: first claimant wins, and a claim is never seen
            # half written (unlike an O_EXCL create that a crash could leave empty).
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text(encoding="ascii").strip()
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return object_id

    def begin_write(self, object_id: str, *, replace: bool = False) -> FilePending:
        # rename() replaces, so concurrent seals of one id end with one whole object either way;
        # ``replace`` only matters to stores that can refuse a second writer.
        final = self.path_of(object_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{object_id}.{secrets.token_hex(6)}.tmp"
        return FilePending(final, tmp)

    def remove(self, object_id: str) -> None:
        self.path_of(object_id).unlink(missing_ok=True)

    def object_ids(self) -> Iterator[str]:
        for path in sorted(self.root.glob(f"??/??/*{SUFFIX}")):
            yield path.name[: -len(SUFFIX)]

    def remove_leftovers(self) -> int:
        # Seals interrupted by a crash: never committed, never acknowledged, safe to drop.
        leftovers = self.leftover_temp_files()
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def leftover_temp_files(self) -> list[Path]:
        # Only files no live seal can still be writing: several processes put into one store
        # (crypto's replicas are not the only writers since seals happen where the bytes are).
        cutoff = time.time() - self.leftover_age_s
        found = []
        for path in self.root.rglob("*.tmp"):
            try:
                if path.stat().st_mtime <= cutoff:
                    found.append(path)
            except FileNotFoundError:
                pass  # committed or aborted meanwhile
        return sorted(found)


class FilePending:
    def __init__(self, final: Path, tmp: Path) -> None:
        self.final = final
        self.tmp = tmp
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            self.size += len(data)

    def sync_data(self) -> None:
        self._file.flush()
        os.fdatasync(self._file.fileno())

    def commit(self) -> bool:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power loss
        finally:
            os.close(dir_fd)
        return True

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)
