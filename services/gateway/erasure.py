"""Drops a crypto-shredded patient's study index entries, on `dicom.erased`.

Destroying the erasure key makes the patient's objects unreadable, but the index keeps their
QIDO keys (PatientName, PatientID, dates) in clear; GDPR erasure must reach those too. The
deletion is idempotent, and the offset is committed only after it (consume_forever), so a
crash or a MongoDB outage redelivers the event instead of losing it.
"""

from __future__ import annotations

import datetime as dt
import logging

from aiokafka import ConsumerRecord

from dicomsafe.common.kafka import PermanentError, TransientError, decode_value
from dicomsafe.v1 import events_pb2
from services.gateway.study_index import StudyIndex

log = logging.getLogger("dicomsafe.gateway.erasure")


class IndexEraser:
    def __init__(self, index: StudyIndex) -> None:
        self._index = index

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        event = decode_value(record, events_pb2.PatientErased, "bad_envelope")
        if not event.patient_ref:
            raise PermanentError("bad_envelope", "erasure event without patient reference")
        try:
            # Objects sealed up to the key's destruction; an event without the time covers all.
            erased_at = event.erased_at.ToDatetime(dt.UTC) if event.HasField("erased_at") else dt.datetime.now(dt.UTC)
            removed = await self._index.remove_patient(event.patient_ref, erased_at)
        except Exception as exc:  # noqa: BLE001 - MongoDB down: keep the offset, retry
            raise TransientError(f"index delete failed ({type(exc).__name__})") from None
        # The pseudonym is no PHI (the audit trail carries it too); it ties this to the erasure.
        log.info(
            "erased patient's index entries removed",
            extra={"patient_ref": event.patient_ref, "request_id": event.request_id, "entries": removed},
        )
