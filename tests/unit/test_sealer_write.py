"""The sealer's write step: one pass over the plaintext, digest checked or taken as given."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dicomsafe.storage import sealed_format as fmt
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.storage.sealer import _HashMismatch, _seal_and_put
from dicomsafe.storage.store_fs import FileStore

pytestmark = pytest.mark.unit


def _writer(object_id: str) -> tuple[fmt.SealWriter, bytes]:
    dek = os.urandom(32)
    header = fmt.SealedHeader.create(
        key_name="k",
        key_version=1,
        wrapped_dek="vault:v1:abc",
        object_id=object_id,
        sop_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3",
        chunk_size=64 * 1024,
    )
    return fmt.SealWriter(dek, header), dek


@pytest.mark.parametrize("known", [False, True])
def test_seal_and_put_stores_what_opens_to_the_plaintext(tmp_path: Path, known: bool) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several write pieces and a partial one
    sha = hashlib.sha256(data).hexdigest()
    object_id = object_id_for("1.2.3.4", sha)
    store = FileStore(tmp_path)
    writer, dek = _writer(object_id)
    got, committed = _seal_and_put(writer, store.begin_write(object_id), data, sha, sha if known else "")
    assert (got, committed) == (sha, True)
    with store.open_read(object_id) as f:
        header, plaintext = fmt.open_bytes(dek, f.read())
    assert plaintext == data and header.object_id == object_id


def test_a_digest_that_does_not_match_publishes_nothing(tmp_path: Path) -> None:
    data = b"\x00" * 1000
    object_id = object_id_for("1.2.3.4", hashlib.sha256(data).hexdigest())
    store = FileStore(tmp_path)
    writer, _ = _writer(object_id)
    with pytest.raises(_HashMismatch):
        _seal_and_put(writer, store.begin_write(object_id), data, hashlib.sha256(b"other").hexdigest())
    assert not store.exists(object_id)
