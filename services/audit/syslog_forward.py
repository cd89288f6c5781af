"""Forwarding the trail to an external audit repository: RFC 5424 syslog over TLS (RFC 5425).

Each record goes out as the DICOM PS3.15 A.5 audit message (XML, the message DICOM's audit
profile carries over syslog) with the record's chain, seq and hash as structured data, framed
by octet counting. TLS 1.3 only, the repository's certificate checked against a CA file and
its host name. Every interval the records after each chain's forwarded position are sent in
seq order, then the position is recorded (an insert-only marker in the audit database), so a
restart resumes where it stopped; a crash between sending and marking sends those records once
more (the repository sees the same chain/seq/hash twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

from dicomsafe.v1 import audit_pb2
from services.audit.exports import EVENTS, NotExportable, to_dicom_xml
from services.audit.store import AuditStore

log = logging.getLogger("dicomsafe.audit.syslog")

APP_NAME = "dicomsafe-audit"
# Facility 13 "log audit" (RFC 5424 6.2.1).
_FACILITY = 13
_SEVERITY = {
    audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS: 6,  # informational
    audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED: 4,  # warning
    audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE: 3,  # error
}
# Structured data ID under the enterprise number RFC 5612 reserves for documentation; a
# deployment with its own enterprise number changes it here.
SD_ID = "dicomsafe@32473"
_BOM = "\ufeff"


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    ca_file: str
    hostname: str  # ours, in the HOSTNAME field


def tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _param(value: str) -> str:
    """An SD-PARAM value: '"', '\\' and ']' escaped (RFC 5424 6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def to_rfc5424(record: audit_pb2.AuditRecord, hostname: str) -> bytes:
    """One syslog message; raises ``NotExportable`` for an action without a DICOM mapping."""
    xml = to_dicom_xml(record)
    priority = _FACILITY * 8 + _SEVERITY.get(record.event.outcome, 3)
    timestamp = record.recorded_at.ToDatetime().isoformat(timespec="milliseconds") + "Z"
    msgid = EVENTS[record.event.action].code
    sd = f'[{SD_ID} chain="{_param(record.chain)}" seq="{record.seq}" hash="{record.hash}"]'
    return f"<{priority}>1 {timestamp} {hostname} {APP_NAME} - {msgid} {sd} {_BOM}{xml}".encode()


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode() + b" " + message


class SyslogForwarder:
    def __init__(self, store: AuditStore, target: SyslogTarget, batch: int = 500) -> None:
        self._store = store
        self._target = target
        self._context = tls_context(target.ca_file)
        self._batch = batch

    async def run_once(self) -> int:
        """Send what each chain has beyond its forwarded position; return how many records."""
        sent = 0
        for chain in await self._store.chains():
            after = await self._store.forwarded_up_to(chain)
            records = await self._store.records_after(chain, after, self._batch)
            if not records:
                continue
            messages = []
            for record in records:
                with contextlib.suppress(NotExportable):  # a newer producer's action: no mapping yet
                    messages.append(frame(to_rfc5424(record, self._target.hostname)))
            await self._send(b"".join(messages))
            await self._store.mark_forwarded(chain, records[-1].seq)
            sent += len(records)
        return sent

    async def _send(self, payload: bytes) -> None:
        _, writer = await asyncio.open_connection(
            self._target.host, self._target.port, ssl=self._context, server_hostname=self._target.host
        )
        try:
            writer.write(payload)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def forward_forever(forwarder: SyslogForwarder, interval_s: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            sent = await forwarder.run_once()
            if sent:
                log.info("records forwarded to the audit repository", extra={"records": sent})
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            # The repository is down or refuses us: the position stays, the next run resends.
            log.warning("audit repository unreachable; will retry", extra={"error": type(exc).__name__})
        except Exception as exc:  # noqa: BLE001 — forwarding must not stop the audit consumer
            log.error("forwarding failed; will retry", extra={"error": type(exc).__name__})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
