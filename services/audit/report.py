"""A verification's answer: built once as the Verify contract (`VerifyResponse`), whichever way
it was computed (the RPC, or the CLI straight on MongoDB), and printed from that for people or
as JSON, so the two CLI paths cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from dicomsafe.v1 import audit_pb2
from services.audit.chain import Break, IntactRange
from services.audit.store import Verdict


def _broken(b: Break) -> audit_pb2.BrokenLink:
    return audit_pb2.BrokenLink(
        chain=b.chain, seq=b.seq, reason=b.reason, seq_to=b.last, kind=b.kind, event_id=b.event_id
    )


def _range(r: IntactRange) -> audit_pb2.IntactRange:
    return audit_pb2.IntactRange(
        chain=r.chain,
        seq_from=r.seq_from,
        seq_to=r.seq_to,
        checkpoints=r.checkpoints,
        first_checkpoint_seq=r.first_checkpoint_seq,
        last_checkpoint_seq=r.last_checkpoint_seq,
    )


def to_response(verdict: Verdict, published_breaks: Sequence[Break] = ()) -> audit_pb2.VerifyResponse:
    """``published_breaks``: bad checkpoints read from `audit.checkpoints` (their chain's records
    are checked by the verdict; these stand on their own, so they are listed in both fields)."""
    breaks = [*published_breaks, *verdict.breaks]
    return audit_pb2.VerifyResponse(
        ok=not breaks and not verdict.unlisted_breaks,
        chains_checked=verdict.chains,
        records_checked=verdict.records,
        broken=[_broken(b) for b in [*published_breaks, *verdict.first_breaks()]],
        checkpoints_checked=verdict.checkpoints,
        breaks=[_broken(b) for b in breaks],
        intact=[_range(r) for r in verdict.intact],
        breaks_not_listed=verdict.unlisted_breaks,
        ranges_not_listed=verdict.unlisted_ranges,
    )


def _seqs(first: int, last: int) -> str:
    return str(first) if last <= first else f"{first}-{last}"


def _kind(kind: audit_pb2.BreakKind.ValueType) -> str:
    return audit_pb2.BreakKind.Name(kind).removeprefix("BREAK_KIND_").lower()


def human(response: audit_pb2.VerifyResponse) -> list[str]:
    """One line per break and per intact range, then the verdict."""
    lines = [
        f"{response.records_checked} records in {response.chains_checked} chains, "
        f"{response.checkpoints_checked} signed checkpoints"
    ]
    # A server from before `breaks` fills only `broken`.
    for b in response.breaks or response.broken:
        where = f"BROKEN {b.chain} at seq {_seqs(b.seq, b.seq_to)}: {b.reason}"
        about = ", ".join([_kind(b.kind), *([f"event {b.event_id}"] if b.event_id else [])])
        lines.append(f"{where} ({about})" if b.kind else where)
    if response.breaks_not_listed:
        lines.append(f"... and {response.breaks_not_listed} more breaks not listed")
    for r in response.intact:
        confirmed = (
            f"{r.checkpoints} signed checkpoints, confirmed up to seq {r.last_checkpoint_seq}"
            if r.checkpoints
            else "no signed checkpoint in it"
        )
        lines.append(f"INTACT {r.chain} seq {_seqs(r.seq_from, r.seq_to)} ({confirmed})")
    if response.ranges_not_listed:
        lines.append(f"... and {response.ranges_not_listed} more intact ranges not listed")
    lines.append("OK" if response.ok else "TAMPERING OR LOSS DETECTED")
    return lines


def as_json(response: audit_pb2.VerifyResponse) -> str:
    return json.dumps(
        MessageToDict(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        ),
        separators=(",", ":"),
    )


def show(response: audit_pb2.VerifyResponse, json_output: bool) -> int:
    """Print the answer; the exit code: 1 on any break, else 0."""
    print(as_json(response) if json_output else "\n".join(human(response)))
    return 0 if response.ok else 1
