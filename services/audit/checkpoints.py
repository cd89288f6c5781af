"""Signed checkpoints of the chain heads, so truncating a chain's tail is detectable too.

Every so often the service signs `(chain, seq, hash)` of each chain it writes with a
non-exportable ed25519 key in Vault Transit and stores the checkpoint beside the records.
Verification checks signatures offline against the public keys Vault publishes, so it needs
no signing right; a chain shorter than its newest checkpoint has lost records at its end.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dicomsafe.common.vault import VaultSession

CHECKPOINT_KEY = "dicomsafe-audit-checkpoint"
_DOMAIN = b"dicomsafe/audit-checkpoint/v1\x00"


@dataclass(frozen=True)
class Checkpoint:
    chain: str
    seq: int
    hash: str
    signature: str  # vault:vN:<base64>


def message(chain: str, seq: int, head_hash: str) -> bytes:
    return _DOMAIN + f"{chain}\x00{seq}\x00{head_hash}".encode()


class CheckpointSigner:
    def __init__(self, session: VaultSession, key: str = CHECKPOINT_KEY, mount: str = "transit") -> None:
        self._session = session
        self._key = key
        self._mount = mount

    def sign(self, chain: str, seq: int, head_hash: str) -> Checkpoint:
        payload = base64.b64encode(message(chain, seq, head_hash)).decode()
        key, mount = self._key, self._mount
        data = self._session.call(
            "checkpoint sign", lambda c: c.secrets.transit.sign_data(key, hash_input=payload, mount_point=mount)
        )
        return Checkpoint(chain, seq, head_hash, str(data["signature"]))

    def public_keys(self) -> dict[int, Ed25519PublicKey]:
        key, mount = self._key, self._mount
        data = self._session.call("checkpoint key read", lambda c: c.secrets.transit.read_key(key, mount_point=mount))
        versions = dict(data["keys"])  # type: ignore[call-overload]
        return {
            int(version): Ed25519PublicKey.from_public_bytes(base64.b64decode(info["public_key"]))
            for version, info in versions.items()
        }


def signature_valid(public_keys: dict[int, Ed25519PublicKey], checkpoint: Checkpoint) -> bool:
    try:
        _, version, sig = checkpoint.signature.split(":", 2)
        key = public_keys[int(version.removeprefix("v"))]
        key.verify(base64.b64decode(sig), message(checkpoint.chain, checkpoint.seq, checkpoint.hash))
    except (ValueError, KeyError, InvalidSignature):
        return False
    return True
