from __future__ import annotations

from dataclasses import dataclass, field

from dicomsafe.common.config import env_int, env_opt, env_str
from dicomsafe.common.kafka import DEFAULT_MAX_RECORD_BYTES
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.dimse.associations import listener_settings
from dicomsafe.storage.object_store import StoreSettings
from dicomsafe.storage.store_env import store_from_env
from services.ingest.dimse_listener import DimseSettings

DEFAULT_DIMSE_MAX_INSTANCE_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class IngestConfig:
    kafka_bootstrap: str
    topic_prefix: str
    group_id: str
    crypto_target: str
    # Where sealed objects are put (the hot store crypto reads from: same CRYPTO_STORE_URL).
    store: StoreSettings
    # The health service only: ingest serves no RPC of its own.
    grpc_bind: str
    max_instance_bytes: int
    seal_deadline_s: int
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    # Every RPC refused (deny by default); the health service answers any peer.
    grpc_allow: PeerAllowlist = field(default_factory=PeerAllowlist)
    # The DICOM listener (C-ECHO, C-STORE); None = not listening.
    dimse: DimseSettings | None = None

    @classmethod
    def from_env(cls) -> IngestConfig:
        seal_deadline_s = env_int("INGEST_SEAL_DEADLINE_S", 120)
        return cls(
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            group_id=env_str("INGEST_GROUP_ID", "dicomsafe-ingest"),
            crypto_target=env_str("INGEST_CRYPTO_TARGET", "127.0.0.1:50051"),
            store=store_from_env(),
            grpc_bind=env_str("INGEST_GRPC_BIND", "127.0.0.1:50055"),
            max_instance_bytes=env_int("INGEST_MAX_INSTANCE_BYTES", DEFAULT_MAX_RECORD_BYTES),
            seal_deadline_s=seal_deadline_s,
            tls=tls_from_env(),
            dimse=dimse_from_env(seal_deadline_s),
        )


def dimse_from_env(store_timeout_s: int) -> DimseSettings | None:
    """``INGEST_DIMSE_BIND`` (host:port) turns the listener on (dicomsafe.dimse.associations)."""
    listener = listener_settings(
        "INGEST",
        bind=env_opt("INGEST_DIMSE_BIND"),
        peers_file=env_opt("INGEST_DIMSE_PEERS_FILE"),
        ae_title=env_str("INGEST_DIMSE_AE_TITLE", "DICOMSAFE"),
        max_associations=env_int("INGEST_DIMSE_MAX_ASSOCIATIONS", 16),
    )
    if listener is None:
        return None
    return DimseSettings(
        listener=listener,
        max_instance_bytes=env_int("INGEST_DIMSE_MAX_INSTANCE_BYTES", DEFAULT_DIMSE_MAX_INSTANCE_BYTES),
        store_timeout_s=float(store_timeout_s),
    )
