"""Operator tool for the crypto service's Transit key: status, rotate, rewrap, retire.

    python -m tools.keys status
    python -m tools.keys rotate
    python -m tools.keys rewrap              # progress bar, then a report; safe to re-run
    python -m tools.keys retire N            # admin VAULT_TOKEN: min_decryption_version = N

Runs as the "ops" identity: TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE name its certificate
(crypto admits only "ops" to these RPCs).

Rotation procedure (docs/operations.md): rotate → rewrap until the report shows every object
at the latest version and no failures → retire the older versions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from tools import vault_setup


def _bar(done: int, total: int, width: int = 40) -> str:
    filled = width if total == 0 else int(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


async def _run(target: str, tls: TlsConfig | None, command: str) -> int:
    async with new_channel(target, tls) as channel:
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        if command in ("status", "rotate"):
            if command == "status":
                status = await stub.GetKeyStatus(crypto_pb2.KeyStatusRequest())
            else:
                status = await stub.RotateKey(crypto_pb2.RotateKeyRequest())
            print(
                f"{status.key_name}: latest v{status.latest_version}, "
                f"min decryption v{status.min_decryption_version}, min encryption v{status.min_encryption_version}"
            )
            return 0
        final = crypto_pb2.RewrapProgress()
        async for progress in stub.Rewrap(crypto_pb2.RewrapRequest()):
            final = progress
            print(
                f"\rrewrap to v{progress.target_version} {_bar(progress.scanned, progress.total)}", end="", flush=True
            )
        print()
        before = ", ".join(f"v{v}: {n}" for v, n in sorted(final.versions_before.items())) or "none"
        print(f"objects by key version before: {before}")
        print(f"rewrapped {final.rewrapped}, already current {final.already_current}, failed {final.failed}")
        for object_id in final.failed_object_ids:
            print(f"  failed: {object_id}")
        return 0 if final.done and final.failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "rotate", "rewrap", "retire"])
    parser.add_argument("version", nargs="?", type=int, help="for retire: the new min_decryption_version")
    parser.add_argument("--crypto", default=os.environ.get("CRYPTO_TARGET", "127.0.0.1:50051"))
    args = parser.parse_args()
    if args.command == "retire":
        addr, token = os.environ.get("VAULT_ADDR"), os.environ.get("VAULT_TOKEN")
        if not (addr and token and args.version):
            parser.error("retire needs VERSION, VAULT_ADDR and an admin VAULT_TOKEN")
        vault_setup.retire_versions_below(addr, token, args.version, os.environ.get("CRYPTO_KEY_NAME", "dicomsafe-dek"))
        print(f"versions below v{args.version} retired")
        return 0
    # The operator's own certificate (identity "ops"): TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE.
    return asyncio.run(_run(args.crypto, tls_from_env(), args.command))


if __name__ == "__main__":
    sys.exit(main())
