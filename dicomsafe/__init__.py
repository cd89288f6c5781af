"""dicomsafe: shared plumbing (``dicomsafe.common``) and generated contracts (``dicomsafe.v1``)."""

from dicomsafe.common import tls13_pin

# First thing on import, before anything can import grpc (see tls13_pin).
tls13_pin.pin()
