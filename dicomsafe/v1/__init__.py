"""Generated protobuf/gRPC code for proto/dicomsafe/v1 (``make proto``; not committed)."""
