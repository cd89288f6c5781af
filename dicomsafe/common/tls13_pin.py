"""TLS 1.3 only on every gRPC connection, pinned before grpc is imported.

grpcio (1.85) has no Python API for a minimum TLS version on server credentials (upstream
grpc/grpc#37305, PRs #43045/#43074/#43080 still open). What it does honour is the core
setting ``GRPC_SSL_CIPHER_SUITES``, the cipher list for TLS 1.2 and below: BoringSSL (bundled
in the grpcio wheels) ignores it for TLS 1.3, whose suites are fixed. Pinning it to a PSK-only
suite leaves TLS 1.2 with nothing to negotiate — no PSK callback is ever installed, so a PSK
suite is never eligible — while TLS 1.3 is untouched. A TLS 1.2 ClientHello is answered with
NO_SHARED_CIPHER, on servers and on our own client channels alike.

grpc core reads the variable once, when ``grpc`` is first imported; setting it later has no
effect. This module therefore imports nothing from grpc and runs from ``dicomsafe/__init__``;
:func:`require_pinned` lets TLS users refuse to run when the pin came too late.
"""

from __future__ import annotations

import os
import sys

CIPHER_SUITES_VAR = "GRPC_SSL_CIPHER_SUITES"
TLS13_ONLY_CIPHER_SUITES = "PSK-AES128-CBC-SHA"

_pinned_in_time = False


def pin() -> None:
    """Set the cipher list (overriding any other value: TLS 1.2 is never wanted)."""
    global _pinned_in_time
    already = os.environ.get(CIPHER_SUITES_VAR) == TLS13_ONLY_CIPHER_SUITES
    os.environ[CIPHER_SUITES_VAR] = TLS13_ONLY_CIPHER_SUITES
    _pinned_in_time = _pinned_in_time or already or "grpc" not in sys.modules


def require_pinned() -> None:
    if not _pinned_in_time:
        raise RuntimeError(
            f"grpc was imported before {CIPHER_SUITES_VAR} was pinned, so TLS 1.2 would be accepted: "
            f"import dicomsafe before grpc, or set {CIPHER_SUITES_VAR}={TLS13_ONLY_CIPHER_SUITES} in the environment"
        )
