"""The test suite: unit, integration (real servers) and end-to-end (services as processes)."""

# Before anything in this package can import grpc: pins TLS 1.3-only gRPC (dicomsafe.common.tls13_pin).
import dicomsafe  # noqa: F401
