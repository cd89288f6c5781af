"""`python -m services.audit` runs the service.

python -m services.audit verify [--chain C] [--published-checkpoints] [--json]
                                                  recompute the chains: every break and the
                                                  intact ranges; exit 1 if anything is broken
python -m services.audit query --target HOST:PORT [filters] [--page-size N [--page-token T | --all-pages]]
                                                  records through the service (token in
                                                  AUDIT_ACCESS_TOKEN[_FILE]; audited, auditors only)
python -m services.audit provision --password-file F
                                                  admin step: indexes + insert/find-only writer
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics
from dicomsafe.common.mongo_users import provision_with_password_file
from dicomsafe.common.token_fingerprint import token_fingerprint
from dicomsafe.common.vault import VaultSession
from dicomsafe.v1 import audit_pb2
from services.audit.app import main as serve
from services.audit.checkpoint_topic import Published, read_published
from services.audit.checkpoints import CheckpointSigner
from services.audit.config import AuditConfig
from services.audit.exports import NotExportable, to_dicom_xml, to_fhir
from services.audit.paging import Filters
from services.audit.patterns import Rules, find_patterns
from services.audit.progress import ProgressBar
from services.audit.provision import provision
from services.audit.remote_cli import query_pages_via_service, query_via_service, verify_via_service
from services.audit.report import show, to_response
from services.audit.store import AuditStore


async def _verify(chain: str, show_progress: bool, use_published: bool, json_output: bool) -> int:
    cfg = AuditConfig.from_env(serving=False)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        signer = CheckpointSigner(VaultSession(cfg.vault)) if cfg.vault else None
        keys = await asyncio.to_thread(signer.public_keys) if signer else None
        found = Published()
        if use_published:
            if keys is None:
                print("--published-checkpoints needs the checkpoint key (VAULT_*)", file=sys.stderr)
                return 2
            found = await read_published(cfg.kafka_bootstrap, Topics(cfg.topic_prefix).checkpoints, keys)
            # On stderr with --json, so stdout stays one JSON document.
            print(
                f"{found.read} published checkpoints read, {len(found.newest)} chains",
                file=sys.stderr if json_output else sys.stdout,
            )
        newest = {c: cp for c, cp in found.newest.items() if not chain or c == chain}
        store = AuditStore(client, cfg.database)
        bar = ProgressBar(await store.estimated_records()) if show_progress else None
        verdict = await store.verify(chain, keys, bar.advance if bar else None, published=newest)
        if bar:
            bar.finish()
    finally:
        await client.close()
    return show(to_response(verdict, [b for b in found.breaks if not chain or b.chain == chain]), json_output)


def _leaked_token_fingerprint(path: str) -> str:
    """The leaked token is read from a file or stdin (never argv); only its fingerprint is
    used, which is all the trail holds of any token."""
    if not path:
        return ""
    token = (sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")).strip()
    if not token:
        raise SystemExit("the token file is empty")
    return token_fingerprint(token)


async def _exposure(actor: str, fingerprint: str, since: str, until: str) -> int:
    cfg = AuditConfig.from_env(serving=False)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    start, end = _when(since) if since else None, _when(until) if until else None
    try:
        store = AuditStore(client, cfg.database)
        if fingerprint:
            report = await store.exposure_of_token(fingerprint, start, end)
        else:
            report = await store.exposure(actor, start, end)
    finally:
        await client.close()
    print(
        f"{report.actor}: {report.events} disclosures, "
        f"{len(report.patient_refs)} patients, {len(report.studies)} studies"
        f" (+{len(report.queried_studies - report.studies)} more studies seen in query answers)"
    )
    for ref in sorted(report.patient_refs):
        print(f"patient {ref}")
    for study in sorted(report.studies):
        print(f"study   {study}")
    for study in sorted(report.queried_studies - report.studies):
        print(f"queried {study}")
    return 0


async def _export(fmt: str, actor: str, patient_ref: str, since: str, until: str, limit: int) -> int:
    cfg = AuditConfig.from_env(serving=False)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    skipped = 0
    try:
        filters = Filters(
            actor=actor,
            patient_ref=patient_ref,
            since=_when(since) if since else None,
            until=_when(until) if until else None,
        )
        records = AuditStore(client, cfg.database).query(filters, limit)
        async for record in records:
            try:
                print(to_dicom_xml(record) if fmt == "dicom" else json.dumps(to_fhir(record), separators=(",", ":")))
            except NotExportable:
                skipped += 1
    finally:
        await client.close()
    if skipped:
        print(f"{skipped} records skipped: no standard mapping for their action", file=sys.stderr)
    return 0


async def _report(since: str, until: str, rules: Rules) -> int:
    cfg = AuditConfig.from_env(serving=False)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        store = AuditStore(client, cfg.database)
        events = [
            e async for e in store.events_between(_when(since) if since else None, _when(until) if until else None)
        ]
    finally:
        await client.close()
    findings = find_patterns(events, rules)
    print(f"{len(events)} events examined, {len(findings)} findings")
    for f in findings:
        print(f"{f.rule:<14} {f.actor:<20} {f.explanation}")
    return 0


def _enum_values(names: list[str], enum: Any, prefix: str) -> list[int]:
    """``retrieved``-style short names or full enum names, case-insensitive."""
    values = []
    for name in names:
        full = name.upper() if name.upper().startswith(prefix) else prefix + name.upper()
        try:
            values.append(int(enum.Value(full)))
        except ValueError:
            raise SystemExit(f"unknown value {name!r} (one of {', '.join(enum.keys()[1:])})") from None
    return values


def _when(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _provision(password_file: Path) -> int:
    admin_uri = os.environ.get("MONGODB_ADMIN_URI", "")
    if not admin_uri:
        print("set MONGODB_ADMIN_URI (an administrator's connection string)", file=sys.stderr)
        return 2
    database = os.environ.get("AUDIT_MONGODB_DB", "dicomsafe_audit")
    user = provision_with_password_file(password_file, lambda pw: provision(admin_uri, database, pw))
    print(f"{database}: indexes ready; user {user} may only insert and find (password in {password_file})")
    return 0


if len(sys.argv) > 1:
    parser = argparse.ArgumentParser(prog="python -m services.audit")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify", help="recompute every hash chain: every break and the intact ranges between (exit 1 on any break)"
    )
    verify.add_argument("--chain", default="")
    verify.add_argument(
        "--progress", action="store_true", help="progress bar on stderr (default: only when stderr is a terminal)"
    )
    verify.add_argument(
        "--target", default="", help="ask the running service (token in AUDIT_ACCESS_TOKEN[_FILE]) instead of MongoDB"
    )
    verify.add_argument("--subject", default="", help="subject id (only where authz runs without an identity provider)")
    verify.add_argument(
        "--published-checkpoints",
        action="store_true",
        help="also check the newest checkpoint per chain published on audit.checkpoints (KAFKA_BOOTSTRAP)",
    )
    verify.add_argument("--json", action="store_true", help="the answer as one JSON object (the VerifyResponse)")
    query = sub.add_parser("query", help="records through the running service: authorised by authz, itself audited")
    query.add_argument("--target", required=True, help="the audit service, host:port")
    query.add_argument("--subject", default="", help="subject id (only where authz runs without an identity provider)")
    query.add_argument("--actor", default="")
    query.add_argument("--patient-ref", default="")
    query.add_argument("--study", default="")
    query.add_argument("--object-id", default="")
    query.add_argument("--since", default="", help="ISO 8601, UTC if no offset")
    query.add_argument("--until", default="")
    query.add_argument("--limit", type=int, default=100, help="without --page-size: at most this many records")
    query.add_argument("--action", action="append", default=[], help="e.g. INSTANCE_RETRIEVED (repeatable)")
    query.add_argument("--outcome", action="append", default=[], help="SUCCESS, DENIED or FAILURE (repeatable)")
    query.add_argument("--page-size", type=int, default=0, help="page through the result (next token on stderr)")
    query.add_argument("--page-token", default="", help="continue after the page that printed this token")
    query.add_argument("--all-pages", action="store_true", help="with --page-size: walk every page")
    prov = sub.add_parser("provision", help="admin: create indexes and the insert/find-only writer")
    prov.add_argument("--password-file", type=Path, required=True, help="read if present, else generated and written")
    exposure = sub.add_parser(
        "exposure", help="which patients and studies a subject received in a time window (breach notices)"
    )
    who = exposure.add_mutually_exclusive_group(required=True)
    who.add_argument("--actor", default="")
    who.add_argument("--token-file", default="", help="a leaked access token ('-' = stdin): what was released under it")
    exposure.add_argument("--since", default="", help="ISO 8601, UTC if no offset")
    exposure.add_argument("--until", default="")
    export = sub.add_parser(
        "export", help="records as DICOM PS3.15 audit messages (XML) or FHIR R4 AuditEvent (NDJSON)"
    )
    export.add_argument("--format", choices=["fhir", "dicom"], required=True)
    export.add_argument("--actor", default="")
    export.add_argument("--patient-ref", default="")
    export.add_argument("--since", default="")
    export.add_argument("--until", default="")
    export.add_argument("--limit", type=int, default=10_000)
    report = sub.add_parser("report", help="unusual-pattern report over a time window (explicit rules)")
    report.add_argument("--since", default="")
    report.add_argument("--until", default="")
    report.add_argument("--timezone", default="UTC", help="the hospital's time zone, for working hours")
    report.add_argument("--many-patients", type=int, default=20)
    report.add_argument("--denial-burst", type=int, default=5)
    report.add_argument(
        "--sensitive-label", action="append", default=None, help="labels that make a study sensitive (default: any)"
    )
    args = parser.parse_args()
    if args.command == "report":
        rules = Rules(
            timezone=args.timezone,
            many_patients=args.many_patients,
            denial_burst=args.denial_burst,
            sensitive_labels=frozenset(args.sensitive_label) if args.sensitive_label else None,
        )
        sys.exit(asyncio.run(_report(args.since, args.until, rules)))
    if args.command == "export":
        sys.exit(asyncio.run(_export(args.format, args.actor, args.patient_ref, args.since, args.until, args.limit)))
    if args.command == "verify" and args.target:
        sys.exit(
            asyncio.run(
                verify_via_service(args.target, args.subject, args.chain, args.published_checkpoints, args.json)
            )
        )
    if args.command == "verify":
        sys.exit(
            asyncio.run(
                _verify(args.chain, args.progress or sys.stderr.isatty(), args.published_checkpoints, args.json)
            )
        )
    if args.command == "query":
        request = audit_pb2.QueryRequest(
            actor=args.actor,
            patient_ref=args.patient_ref,
            study_instance_uid=args.study,
            object_id=args.object_id,
            limit=args.limit,
            actions=_enum_values(args.action, audit_pb2.AuditAction, "AUDIT_ACTION_"),  # type: ignore[arg-type]
            outcomes=_enum_values(args.outcome, audit_pb2.AuditOutcome, "AUDIT_OUTCOME_"),  # type: ignore[arg-type]
            page_size=args.page_size,
            page_token=args.page_token,
        )
        if args.since:
            request.since.FromDatetime(_when(args.since))
        if args.until:
            request.until.FromDatetime(_when(args.until))
        if args.page_size or args.page_token:
            sys.exit(asyncio.run(query_pages_via_service(args.target, args.subject, request, args.all_pages)))
        sys.exit(asyncio.run(query_via_service(args.target, args.subject, request)))
    if args.command == "exposure":
        fingerprint = _leaked_token_fingerprint(args.token_file)
        sys.exit(asyncio.run(_exposure(args.actor, fingerprint, args.since, args.until)))
    sys.exit(_provision(args.password_file))
serve()
