from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicomsafe.common.config import ConfigError, env_int, env_opt, env_secret, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.common.vault import vault_auth_from_env
from services.crypto.object_store import S3Settings, StoreSettings, file_url
from services.crypto.sealed_format import DEFAULT_CHUNK_SIZE
from services.crypto.vault_keys import VaultSettings

# Least privilege by caller: ingest seals, the gateway reads, ops tooling manages keys.
DEFAULT_GRPC_ALLOW = "Seal=ingest; Open,Describe=gateway; RotateKey,GetKeyStatus,Rewrap=ops"
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


def s3_from_env() -> S3Settings:
    """The S3 API named by ``S3_*`` (the same names ``tools.infra env`` prints); keys also as
    ``*_FILE``. No keys: botocore's default chain (e.g. a service account's web identity)."""
    return S3Settings(
        endpoint_url=env_opt("S3_ENDPOINT_URL"),
        region=env_str("S3_REGION", "us-east-1"),
        access_key_id=env_secret("S3_ACCESS_KEY_ID"),
        secret_access_key=env_secret("S3_SECRET_ACCESS_KEY"),
        ca_bundle=env_opt("S3_CA_BUNDLE"),
    )


def archive_from_env() -> StoreSettings | None:
    """``CRYPTO_ARCHIVE_STORE_URL`` (same forms as the hot store; S3 through the same ``S3_*``)."""
    url = env_opt("CRYPTO_ARCHIVE_STORE_URL")
    if not url:
        return None
    return StoreSettings(
        url=url,
        s3=s3_from_env() if url.startswith("s3://") else S3Settings(),
        part_size=env_int("CRYPTO_STORE_PART_SIZE", StoreSettings.part_size),
        retention_days=env_int("CRYPTO_ARCHIVE_RETENTION_DAYS", 0),
        retention_mode=env_str("CRYPTO_ARCHIVE_RETENTION_MODE", "COMPLIANCE"),
    )


def store_from_env() -> StoreSettings:
    # CRYPTO_STORE_DIR is the older name of a filesystem store, still honoured.
    url = env_opt("CRYPTO_STORE_URL") or file_url(Path(env_str("CRYPTO_STORE_DIR", "var/store")))
    return StoreSettings(
        url=url,
        s3=s3_from_env() if url.startswith("s3://") else S3Settings(),
        part_size=env_int("CRYPTO_STORE_PART_SIZE", StoreSettings.part_size),
    )
