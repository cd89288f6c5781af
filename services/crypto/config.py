from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicomsafe.common.config import ConfigError, env_int, env_opt, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.common.vault import vault_auth_from_env
from dicomsafe.storage.object_store import StoreSettings
from dicomsafe.storage.sealed_format import DEFAULT_CHUNK_SIZE
from dicomsafe.storage.store_env import archive_from_env, store_from_env
from services.crypto.vault_keys import VaultSettings

# Least privilege by caller: ingest and the gateway (STOW-RS) get seal keys for what they store,
# the gateway reads, ops tooling manages keys.
DEFAULT_GRPC_ALLOW = "PrepareSeal=ingest,gateway; Open,Describe=gateway; RotateKey,GetKeyStatus,Rewrap=ops"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class CryptoConfig:
    grpc_bind: str
    store: StoreSettings
    chunk_size: int
    max_object_bytes: int
    kafka_bootstrap: str
    topic_prefix: str
    vault: VaultSettings
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST
    # The archive tier (CRYPTO_ARCHIVE_STORE_URL): objects the tiering job moved there are read
    # from it transparently. None = one tier.
    archive: StoreSettings | None = None

    @property
    def store_dir(self) -> Path:
        """The directory of a filesystem store (tests and tools that look at files)."""
        root = self.store.local_root
        if root is None:
            raise ConfigError(f"the store is not a directory: {self.store.url}")
        return root

    @classmethod
    def from_env(cls) -> CryptoConfig:
        auth = vault_auth_from_env()
        return cls(
            grpc_bind=env_str("CRYPTO_GRPC_BIND", "127.0.0.1:50051"),
            store=store_from_env(),
            archive=archive_from_env(),
            chunk_size=env_int("CRYPTO_CHUNK_SIZE", DEFAULT_CHUNK_SIZE),
            max_object_bytes=env_int("CRYPTO_MAX_OBJECT_BYTES", 4 * 1024**3),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            vault=VaultSettings(
                addr=auth.addr,
                transit_mount=env_str("VAULT_TRANSIT_MOUNT", "transit"),
                key_name=env_str("CRYPTO_KEY_NAME", "dicomsafe-dek"),
                token=auth.token,
                role_id=auth.role_id,
                secret_id=auth.secret_id,
                ca_cert=auth.ca_cert,
                dek_cache_ttl_s=env_int("CRYPTO_DEK_CACHE_TTL_S", 30),
                erasure_key_cache_ttl_s=env_int("CRYPTO_ERASURE_KEY_CACHE_TTL_S", 5),
                k8s_role=auth.k8s_role,
                k8s_token_path=auth.k8s_token_path,
                k8s_mount=auth.k8s_mount,
            ),
            tls=tls_from_env(),
            grpc_allow=PeerAllowlist.parse(env_str("CRYPTO_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
        )
