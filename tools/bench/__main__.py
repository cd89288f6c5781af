"""`make bench` — writes bench-results.json: a list of
{metric, value, unit, baseline, ratio, target, higher_is_better}.

Uses servers named by KAFKA_BOOTSTRAP, VAULT_ADDR + VAULT_TOKEN, MONGODB_URI and
S3_ENDPOINT_URL + S3_ACCESS_KEY_ID + S3_SECRET_ACCESS_KEY, else starts the local ones (and
stops them afterwards).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dicomsafe.storage.object_store import S3Settings
from tools import infra
from tools.bench import (
    audit_append,
    audit_verify,
    authz_check,
    crypto_throughput,
    dicomweb,
    dimse_store,
    store_throughput,
)
from tools.bench.results import Result, report
from tools.debian_packages import PackageMissing
from tools.orthanc import OrthancMissing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", default="1,16,256", help="crypto object sizes in MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--audit-events", type=int, default=20_000)
    parser.add_argument("--authz-checks", type=int, default=3000, help="authz checks per configuration")
    # Enough that the servers' idle polling and JIT, counted in the CPU per instance, are spread thin.
    parser.add_argument("--dicomweb-instances", type=int, default=200)
    parser.add_argument("--dicomweb-rounds", type=int, default=5)
    parser.add_argument("--dimse-instances", type=int, default=200, help="0.5 MB CT instances C-STOREd per side")
    parser.add_argument("--store-sizes-mib", default="1,16", help="object sizes of the S3-vs-filesystem part")
    parser.add_argument(
        "--only", choices=["crypto", "store", "audit", "authz", "dicomweb", "dimse"], help="run one part only"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also profile the STOW-RS path with py-spy after the measured runs; folded stacks go to DIR",
    )
    args = parser.parse_args()

    kafka, mongo = os.environ.get("KAFKA_BOOTSTRAP", ""), os.environ.get("MONGODB_URI", "")
    vault_addr, vault_token = os.environ.get("VAULT_ADDR", ""), os.environ.get("VAULT_TOKEN", "")
    s3_env = [os.environ.get(f"S3_{k}", "") for k in ("ENDPOINT_URL", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY")]
    have_s3 = all(s3_env) or args.only not in (None, "store")
    need = [
        n
        for n, have in (("kafka", kafka), ("vault", vault_addr and vault_token), ("mongo", mongo), ("s3", have_s3))
        if not have
    ]
    if "mongo" in need and not os.environ.get(infra.MONGO_SERVER_ENV):
        # A deployment runs a compiled mongod: the compiled MongoDB-wire server, not the Python
        # one, is what the stack's instances are charged for (docs/performance.md).
        try:
            infra.ensure_mongo_rust()
            os.environ[infra.MONGO_SERVER_ENV] = "rust"
        except infra.InfraError as exc:
            print(f"compiled MongoDB-wire server unavailable, benches use the Python one: {exc}")
    local = infra.up(need) if need else None
    if "mongo" in need:
        print(f"MongoDB-wire server: {infra.mongo_server_started()}")
    if local:
        kafka, mongo = kafka or local.kafka_bootstrap, mongo or local.mongodb_uri
        if "vault" in need:
            vault_addr, vault_token = local.vault_addr, local.vault_token
        if "s3" in need:
            s3_env = [local.s3_endpoint_url, local.s3_access_key_id, local.s3_secret_access_key]
    s3 = S3Settings(
        endpoint_url=s3_env[0],
        region=os.environ.get("S3_REGION") or infra.S3_REGION,
        access_key_id=s3_env[1],
        secret_access_key=s3_env[2],
    )
    results: list[Result] = []
    missing: list[str] = []
    try:
        if args.only in (None, "crypto"):
            sizes = [int(s) for s in args.sizes_mib.split(",")]
            results += crypto_throughput.run(kafka, vault_addr, vault_token, sizes, args.rounds)
        if args.only in (None, "store"):
            sizes = [int(s) for s in args.store_sizes_mib.split(",")]
            results += store_throughput.run(kafka, vault_addr, vault_token, s3, sizes, args.rounds)
        if args.only in (None, "audit"):
            results += audit_append.run(mongo, args.audit_events)
            results += audit_verify.run(mongo, args.audit_events)
        if args.only in (None, "authz"):
            results += authz_check.run(kafka, mongo, args.authz_checks)
        if args.only in (None, "dicomweb"):
            try:
                results += dicomweb.run(
                    kafka, vault_addr, vault_token, mongo, args.dicomweb_instances, args.dicomweb_rounds, args.profile
                )
            except OrthancMissing as exc:
                # No invented baseline: the comparison is reported as not run, and the exit
                # status says so after the other results are written.
                print(f"dicomweb bench NOT RUN: {exc}")
                missing.append("dicomweb (Orthanc baseline unavailable)")
        if args.only in (None, "dimse"):
            try:
                results += dimse_store.run(kafka, vault_addr, vault_token, mongo, args.dimse_instances)
            except (OrthancMissing, PackageMissing) as exc:
                print(f"dimse bench NOT RUN: {exc}")
                missing.append("dimse (Orthanc or DCMTK unavailable)")
    finally:
        if need:
            infra.down(need)
    report(results, args.out)
    if missing:
        print(f"bench incomplete: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
