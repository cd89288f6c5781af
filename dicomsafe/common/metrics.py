"""Prometheus metrics shared by every service, served on METRICS_BIND (host:port) when set.

Names carry the service as a label rather than in the name, so one dashboard serves all.
Labels never hold identifiers (object ids, UIDs, subjects): cardinality stays bounded and no
PHI reaches the monitoring system.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

from dicomsafe.common.config import env_opt, host_port

RECORDS = Counter(
    "dicomsafe_kafka_records_total",
    "Kafka records finished by a consumer, by outcome (processed, dead_lettered)",
    ["service", "topic", "outcome"],
)
RETRIES = Counter(
    "dicomsafe_kafka_retries_total",
    "Records put back for a retry (dependency down or unexpected error)",
    ["service", "topic"],
)
BYTES = Counter("dicomsafe_bytes_total", "Plaintext bytes handled, by operation (seal, open)", ["service", "operation"])
DURATION = Histogram(
    "dicomsafe_operation_seconds",
    "Duration of an operation (seal, open, check, append)",
    ["service", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECISIONS = Counter("dicomsafe_authz_decisions_total", "Access decisions", ["allow", "reason"])
REFUSED_CALLS = Counter(
    "dicomsafe_grpc_refused_total",
    "gRPC calls refused before the servicer: caller identity not allowed (identity) or not mutual TLS 1.3 (tls)",
    ["method", "reason"],
)
DIMSE_ASSOCIATIONS = Counter(
    "dicomsafe_dimse_associations_total",
    "DIMSE associations by outcome (accepted, refused, handshake_failed)",
    ["outcome"],
)
DIMSE_REQUESTS = Counter(
    "dicomsafe_dimse_requests_total",
    "DIMSE requests answered, by service (echo, store) and result (success, refused, retry_later, not_authorised)",
    ["service", "result"],
)


def serve_metrics() -> str | None:
    """Start the /metrics endpoint if METRICS_BIND is set; returns the address served."""
    bind = env_opt("METRICS_BIND")
    if not bind:
        return None
    host, port = host_port(bind, "127.0.0.1")
    start_http_server(port, addr=host)
    return bind
