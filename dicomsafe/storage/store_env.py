"""The object store's settings from the environment: one set of names (``CRYPTO_STORE_URL``,
``S3_*``) for every process that reaches the store, so that crypto, ingest, the gateway and the
ops tools can never disagree on where the objects are."""

from __future__ import annotations

from pathlib import Path

from dicomsafe.common.config import env_int, env_opt, env_secret, env_str
from dicomsafe.storage.object_store import S3Settings, StoreSettings, file_url


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
