"""The study index keeps each entry's pseudonymous UID, so a researcher's UIDs lead back to the
study — on a real MongoDB-wire server: entries indexed before (or under another key) are backfilled."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import AsyncMongoClient

from services.gateway.deidentify import Deidentifier
from services.gateway.index_entry import IndexEntry, entry_for
from services.gateway.instance_layout import layout_of
from services.gateway.study_index import StudyIndex
from tests.servers import Servers
from tools import dicom_samples


async def test_pseudonymous_uids_resolve_and_follow_the_key(servers: Servers, unique: str) -> None:
    ct = dicom_samples.ct_image(rows=16, columns=16, seed=9)
    ds, layout = layout_of(dicom_samples.to_bytes(ct))
    entry = entry_for(ds, layout, "ef" * 32, 123)
    study, series, sop = str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), str(ct.SOPInstanceUID)
    first, second = Deidentifier(b"a" * 32), Deidentifier(b"b" * 32)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    database = f"index_{unique}"
    try:
        # Indexed by a gateway that kept no pseudonyms: nothing resolves until the backfill.
        await StudyIndex(client, database).add(entry)
        index = StudyIndex(client, database, first)
        await index.ensure_indexes()
        pseudo = [first.pseudonymous_uid(u) for u in (study, series, sop)]
        assert await index.locate_pseudonymous(*pseudo) == []
        assert await index.backfill_pseudonyms() == 3
        assert await index.backfill_pseudonyms() == 0  # idempotent
        [located] = await index.locate_pseudonymous(*pseudo)
        assert (located.study_uid, located.series_uid, located.sop_uid) == (study, series, sop)
        assert await index.real_uids("study", [pseudo[0], "2.25.1"]) == [study]
        # A pseudonymous series under another study, or a real UID, is not a pseudonym.
        assert await index.locate_pseudonymous(pseudo[0], first.pseudonymous_uid("1.2.3")) == []
        assert await index.locate_pseudonymous(study) == []

        # After a key change the stored pseudonyms are stale: replaced, the old ones lead nowhere.
        rotated = StudyIndex(client, database, second)
        assert await rotated.backfill_pseudonyms() == 3
        assert await rotated.locate_pseudonymous(*pseudo) == []
        assert len(await rotated.locate_pseudonymous(*(second.pseudonymous_uid(u) for u in (study, series, sop)))) == 1
        # New entries carry the pseudonym when written.
        other = dicom_samples.ct_image(rows=16, columns=16, seed=10)
        ods, olayout = layout_of(dicom_samples.to_bytes(other))
        await rotated.add(entry_for(ods, olayout, "0f" * 32, 45))
        assert await rotated.real_uids("instance", [second.pseudonymous_uid(str(other.SOPInstanceUID))]) == [
            str(other.SOPInstanceUID)
        ]
        assert await rotated.backfill_pseudonyms() == 0
    finally:
        await client.drop_database(database)
        await client.close()


async def test_an_entry_written_after_its_patients_erasure_removes_itself(servers: Servers, unique: str) -> None:
    """The race of crypto-shredding and indexing: an object sealed before its key was destroyed,
    written just after the erasure was handled, must not come back — while a returning patient's
    later studies (sealed under a fresh key) stay, even when the old erasure is replayed."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    database = f"index_{unique}"
    erased, kept = "ab" * 16, "cd" * 16
    t0 = dt.datetime.now(dt.UTC)
    erased_at = t0 + dt.timedelta(seconds=10)

    def entry(seed: int, patient_ref: str, stored_at: dt.datetime) -> IndexEntry:
        ds, layout = layout_of(dicom_samples.to_bytes(dicom_samples.ct_image(rows=16, columns=16, seed=seed)))
        return entry_for(ds, layout, f"{seed:02x}" * 32, 100, patient_ref, stored_at)

    try:
        index = StudyIndex(client, database)
        await index.ensure_indexes()
        first, late, other = entry(21, erased, t0), entry(22, erased, t0), entry(23, kept, t0)
        await index.add(first)
        await index.add(other)
        assert await index.remove_patient(erased, erased_at) == 3  # instance, series, study
        await index.add(late)  # sealed before the erasure, written after it was handled
        assert await index.locate(late.study_uid) == [] and await index.locate(first.study_uid) == []
        assert len(await index.locate(other.study_uid)) == 1  # another patient is untouched
        for name in ("studies", "series", "instances"):
            assert await client[database][name].count_documents({"patient_ref": erased}) == 0

        returning = entry(24, erased, erased_at + dt.timedelta(days=30))  # back a month later
        await index.add(returning)
        assert len(await index.locate(returning.study_uid)) == 1
        # A redelivered (or, in an index rebuild, replayed) old erasure removes nothing new.
        assert await index.remove_patient(erased, erased_at) == 0
        assert len(await index.locate(returning.study_uid)) == 1
    finally:
        await client.drop_database(database)
        await client.close()
