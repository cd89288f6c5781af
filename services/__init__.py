"""The dicomsafe services, one package each."""

# Before anything in this package can import grpc: pins TLS 1.3-only gRPC (dicomsafe.common.tls13_pin).
import dicomsafe  # noqa: F401
