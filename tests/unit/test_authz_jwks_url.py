"""The identity provider's signing keys are only ever fetched over a channel no one can alter."""

from __future__ import annotations

import pytest

from services.authz.tokens import TokenVerifier, require_secure_jwks_url

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.hospital.example/realms/x/protocol/openid-connect/certs",
        "http://127.0.0.1:8080/.well-known/jwks.json",
        "http://localhost:9000/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    assert require_secure_jwks_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.hospital.example/jwks",
        "http://10.1.2.3/jwks",
        "ftp://idp.hospital.example/jwks",
        "file:///etc/jwks.json",
        "https:///no-host",
        "",
    ],
)
def test_anything_else_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError, match="must be https"):
        require_secure_jwks_url(url)
    with pytest.raises(ValueError, match="must be https"):
        TokenVerifier("https://idp.hospital.example", "dicomsafe", url)
