"""Provision Vault/OpenBao for dicomsafe (an operator step, run with an admin token).

Enables the Transit engine, creates the non-exportable data-key-wrapping key, loads the
crypto service's narrow policy from deploy/vault/ and issues an AppRole for it. Idempotent.

    python -m tools.vault_setup --out var/vault/crypto --audit-out var/vault/audit
                                                  # writes role-id and secret-id files (mode 0600)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions

REPO = Path(__file__).resolve().parent.parent
POLICY_FILE = REPO / "deploy" / "vault" / "crypto-policy.hcl"
POLICY_NAME = "dicomsafe-crypto"
PSEUDONYM_KEY = "dicomsafe-pseudonym"
ERASURE_MOUNT = "dicomsafe-erasure"
ERASURE_POLICY = "dicomsafe-erasure-officer"
ERASURE_POLICY_FILE = REPO / "deploy" / "vault" / "erasure-officer-policy.hcl"
CHECKPOINT_KEY = "dicomsafe-audit-checkpoint"
AUDIT_POLICY = "dicomsafe-audit"
AUDIT_POLICY_FILE = REPO / "deploy" / "vault" / "audit-policy.hcl"


@dataclass(frozen=True)
class AppRoleCredentials:
    role_id: str
    secret_id: str


def provision(
    addr: str, admin_token: str, key_name: str = "dicomsafe-dek", mount: str = "transit"
) -> AppRoleCredentials:
    client = hvac.Client(url=addr, token=admin_token)
    existing = _transit_keys(client, mount)
    if key_name not in existing:
        client.secrets.transit.create_key(
            key_name, key_type="aes256-gcm96", exportable=False, allow_plaintext_backup=False, mount_point=mount
        )
    if PSEUDONYM_KEY not in existing:
        # Pseudonyms must stay stable for years: this key is never rotated (HMACs pin v1).
        client.secrets.transit.create_key(PSEUDONYM_KEY, key_type="aes256-gcm96", exportable=False, mount_point=mount)
    engines = client.sys.list_mounted_secrets_engines()
    if f"{ERASURE_MOUNT}/" not in engines.get("data", engines):
        client.sys.enable_secrets_engine("kv", path=ERASURE_MOUNT, options={"version": "2"})
    client.sys.create_or_update_policy(ERASURE_POLICY, ERASURE_POLICY_FILE.read_text(encoding="utf-8"))
    policy = POLICY_FILE.read_text(encoding="utf-8")
    # One policy and role per key, so deployments sharing a Vault never widen each other.
    names = POLICY_NAME if key_name == "dicomsafe-dek" else f"{POLICY_NAME}-{key_name}"
    if key_name != "dicomsafe-dek" or mount != "transit":
        policy = policy.replace("transit/", f"{mount}/").replace("dicomsafe-dek", key_name)
    return _approle(client, names, policy)


def provision_audit(addr: str, admin_token: str, mount: str = "transit") -> AppRoleCredentials:
    """The audit service's identity: sign chain checkpoints with an ed25519 Transit key."""
    client = hvac.Client(url=addr, token=admin_token)
    if CHECKPOINT_KEY not in _transit_keys(client, mount):
        client.secrets.transit.create_key(CHECKPOINT_KEY, key_type="ed25519", exportable=False, mount_point=mount)
    return _approle(
        client, AUDIT_POLICY, AUDIT_POLICY_FILE.read_text(encoding="utf-8").replace("transit/", f"{mount}/")
    )


def _transit_keys(client: hvac.Client, mount: str) -> set[str]:
    """Key names on the Transit mount, enabling the mount if needed."""
    engines = client.sys.list_mounted_secrets_engines()
    if f"{mount}/" not in engines.get("data", engines):
        client.sys.enable_secrets_engine("transit", path=mount)
    try:
        return set(client.secrets.transit.list_keys(mount_point=mount)["data"]["keys"])
    except hvac.exceptions.InvalidPath:
        return set()  # Vault answers 404 while the mount has no key


def _approle(client: hvac.Client, name: str, policy: str) -> AppRoleCredentials:
    """A policy and an AppRole of the same name; short-lived tokens, re-login on expiry."""
    client.sys.create_or_update_policy(name, policy)
    auth_methods = client.sys.list_auth_methods()
    if "approle/" not in auth_methods.get("data", auth_methods):
        client.sys.enable_auth_method("approle")
    client.auth.approle.create_or_update_approle(
        name, token_policies=[name], token_ttl="1h", token_max_ttl="24h", secret_id_ttl="720h"
    )
    role_id = client.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    return AppRoleCredentials(str(role_id), str(secret_id))


def erasure_officer_token(addr: str, admin_token: str, ttl: str = "15m") -> str:
    """A short-lived token with only the erasure officer's policy (issue one per erasure)."""
    client = hvac.Client(url=addr, token=admin_token)
    created = client.auth.token.create(policies=[ERASURE_POLICY], ttl=ttl, renewable=False, no_parent=True)
    return str(created["auth"]["client_token"])


def retire_versions_below(
    addr: str, admin_token: str, version: int, key_name: str = "dicomsafe-dek", mount: str = "transit"
) -> None:
    """Raise min_decryption_version: wrapped keys older than ``version`` no longer open.

    Run only after a rewrap has reported every object at ``version`` or newer.
    """
    client = hvac.Client(url=addr, token=admin_token)
    client.secrets.transit.update_key_configuration(key_name, min_decryption_version=version, mount_point=mount)


def write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("var/vault"), help="folder for crypto's role-id and secret-id")
    parser.add_argument("--audit-out", type=Path, help="also provision the audit service; folder for its credentials")
    parser.add_argument("--key-name", default=os.environ.get("CRYPTO_KEY_NAME", "dicomsafe-dek"))
    parser.add_argument("--mount", default=os.environ.get("VAULT_TRANSIT_MOUNT", "transit"))
    args = parser.parse_args()
    token = os.environ.get("VAULT_TOKEN")
    addr = os.environ.get("VAULT_ADDR")
    if not token or not addr:
        raise SystemExit("set VAULT_ADDR and an admin VAULT_TOKEN")
    identities = [("crypto", args.out, provision(addr, token, args.key_name, args.mount))]
    if args.audit_out:
        identities.append(("audit", args.audit_out, provision_audit(addr, token, args.mount)))
    for service, folder, creds in identities:
        write_secret(folder / "role-id", creds.role_id)
        write_secret(folder / "secret-id", creds.secret_id)
        print(f"{service}: AppRole ready; credentials in {folder}/role-id and {folder}/secret-id")


if __name__ == "__main__":
    main()
