from __future__ import annotations

from dataclasses import dataclass, field

from dicomsafe.common.config import ConfigError, env_int, env_opt, env_secret, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.dimse.associations import listener_settings
from dicomsafe.storage.object_store import StoreSettings
from dicomsafe.storage.store_env import store_from_env
from services.gateway.cors import parse_origins
from services.gateway.dimse_qr import QrSettings

# Retrieval is for the trusted front ends (viewer back-ends) holding a "viewer" certificate;
# the user's own rights come from the access token, checked by authz.
DEFAULT_GRPC_ALLOW = "Retrieve=viewer"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class GatewayConfig:
    grpc_bind: str
    kafka_bootstrap: str
    topic_prefix: str
    authz_target: str
    crypto_target: str
    call_deadline_s: int
    # DICOMweb over HTTPS (TLS 1.3 only).
    http_bind: str
    public_url: str
    tls_cert_file: str
    tls_key_file: str
    # Where STOW-RS puts the instances it seals (the hot store crypto reads from).
    store: StoreSettings
    mongodb_uri: str = field(repr=False)
    index_database: str
    index_group_id: str
    max_instance_bytes: int
    index_grace_s: float
    # Instances of one batch the indexer reads back through crypto at once.
    index_read_concurrency: int
    # Responses up to this size are read and authenticated whole before the status goes out.
    verify_before_send_bytes: int
    # Keys the pseudonymous UIDs of de-identified releases (PS3.15 Annex E).
    deid_uid_key: bytes = field(repr=False)
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST
    # Browser origins allowed to call DICOMweb (services.gateway.cors); empty = no CORS at all.
    cors_origins: frozenset[str] = frozenset()
    # The DIMSE query/retrieve listener (services.gateway.dimse_qr); None = off.
    dimse: QrSettings | None = None

    @classmethod
    def from_env(cls) -> GatewayConfig:
        deid = env_secret("GATEWAY_DEID_UID_KEY")
        if not deid or len(deid) < 16:
            raise ConfigError("GATEWAY_DEID_UID_KEY (or _FILE) must hold at least 16 characters")
        mongodb_uri = env_secret("GATEWAY_MONGODB_URI")
        if not mongodb_uri:
            raise ConfigError("GATEWAY_MONGODB_URI (or _FILE) is required for the study index")
        call_deadline_s = env_int("GATEWAY_CALL_DEADLINE_S", 60)
        return cls(
            grpc_bind=env_str("GATEWAY_GRPC_BIND", "127.0.0.1:50054"),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            authz_target=env_str("GATEWAY_AUTHZ_TARGET", "127.0.0.1:50052"),
            crypto_target=env_str("GATEWAY_CRYPTO_TARGET", "127.0.0.1:50051"),
            call_deadline_s=call_deadline_s,
            http_bind=env_str("GATEWAY_HTTP_BIND", "127.0.0.1:8443"),
            public_url=env_opt("GATEWAY_PUBLIC_URL"),
            tls_cert_file=env_str("GATEWAY_TLS_CERT_FILE"),
            tls_key_file=env_str("GATEWAY_TLS_KEY_FILE"),
            store=store_from_env(),
            mongodb_uri=mongodb_uri,
            index_database=env_str("GATEWAY_INDEX_DATABASE", "dicomsafe_index"),
            index_group_id=env_str("GATEWAY_INDEX_GROUP_ID", "dicomsafe-gateway-index"),
            max_instance_bytes=env_int("GATEWAY_MAX_INSTANCE_BYTES", 256 * 1024 * 1024),
            index_grace_s=env_int("GATEWAY_INDEX_GRACE_S", 2),
            index_read_concurrency=env_int("GATEWAY_INDEX_READ_CONCURRENCY", 8),
            verify_before_send_bytes=env_int("GATEWAY_VERIFY_BEFORE_SEND_BYTES", 64 * 1024 * 1024),
            deid_uid_key=deid.encode(),
            tls=tls_from_env(),
            grpc_allow=PeerAllowlist.parse(env_str("GATEWAY_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
            dimse=dimse_from_env(float(call_deadline_s)),
            cors_origins=cors_from_env(),
        )


def cors_from_env() -> frozenset[str]:
    try:
        return parse_origins(env_opt("GATEWAY_CORS_ORIGINS"))
    except ValueError as exc:
        raise ConfigError(f"GATEWAY_CORS_ORIGINS: {exc}") from None


def dimse_from_env(call_timeout_s: float) -> QrSettings | None:
    """``GATEWAY_DIMSE_BIND`` (host:port) turns the query/retrieve listener on."""
    listener = listener_settings(
        "GATEWAY",
        bind=env_opt("GATEWAY_DIMSE_BIND"),
        peers_file=env_opt("GATEWAY_DIMSE_PEERS_FILE"),
        ae_title=env_str("GATEWAY_DIMSE_AE_TITLE", "DICOMSAFE_QR"),
        max_associations=env_int("GATEWAY_DIMSE_MAX_ASSOCIATIONS", 16),
    )
    if listener is None:
        return None
    return QrSettings(
        listener=listener,
        call_timeout_s=call_timeout_s,
        max_matches=env_int("GATEWAY_DIMSE_MAX_MATCHES", 1000),
        max_retrieve=env_int("GATEWAY_DIMSE_MAX_RETRIEVE", 10000),
        commitment_wait_s=float(env_int("GATEWAY_DIMSE_COMMITMENT_WAIT_S", 60)),
    )
