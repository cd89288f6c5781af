"""The hot object store: sealed objects on a filesystem (a PVC in Kubernetes).

Writes go to a temporary file in the destination directory, are fsynced, then renamed,
so a crash or an aborted seal never leaves a readable half object under the final name.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

OBJECT_ID = re.compile(r"^[0-9a-f]{32,64}$")
SUFFIX = ".dso"
COPY_BLOCK = 1024 * 1024


class InvalidObjectId(ValueError):
    pass


class HotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_of(self, object_id: str) -> Path:
        # Strict pattern: the id becomes a path, so nothing like "../" may pass.
        if not OBJECT_ID.match(object_id):
            raise InvalidObjectId("object id must be 32-64 lowercase hex characters")
        return self.root / object_id[:2] / object_id[2:4] / f"{object_id}{SUFFIX}"

    def exists(self, object_id: str) -> bool:
        return self.path_of(object_id).is_file()

    def open_read(self, object_id: str) -> BinaryIO:
        return self.path_of(object_id).open("rb")

    def begin_write(self, object_id: str) -> PendingObject:
        final = self.path_of(object_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{object_id}.{secrets.token_hex(6)}.tmp"
        return PendingObject(final, tmp)

    def object_ids(self) -> Iterator[str]:
        """Every stored object id, in a stable order (so a resumed job walks the same path)."""
        for path in sorted(self.root.glob(f"??/??/*{SUFFIX}")):
            yield path.name[: -len(SUFFIX)]

    def rewrite_header(self, object_id: str, new_header: bytes, old_header_len: int) -> int:
        """Replace an object's header, copying its chunks byte for byte; returns the new size."""
        pending = self.begin_write(object_id)
        try:
            with self.open_read(object_id) as src:
                pending.write(new_header)
                src.seek(old_header_len)
                while block := src.read(COPY_BLOCK):
                    pending.write(block)
            pending.commit()
        except BaseException:
            pending.abort()
            raise
        return pending.size

    def leftover_temp_files(self) -> list[Path]:
        return sorted(self.root.rglob("*.tmp"))


class PendingObject:
    """A sealed object being written; visible under its id only after ``commit``."""

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
        """Flush what is written so far; safe from a worker thread while writes continue."""
        self._file.flush()
        os.fdatasync(self._file.fileno())

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power loss
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)
