"""Verifying OIDC access tokens (JWT) against the identity provider's JWKS.

Signature (RS256/ES256 only — never `none`, never a symmetric algorithm an attacker could
forge with a public key), issuer, audience, expiry and not-before with a small clock skew.
Every failure becomes a short, stable reason; nothing about the token is echoed back.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from jwt import PyJWKClient
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKClientConnectionError,
    PyJWKClientError,
)

ALGORITHMS = ("RS256", "ES256")
# RFC 8176 authentication method references that mean a second factor was used.
MFA_METHODS = frozenset({"mfa", "otp", "hwk", "sc", "fpt", "face", "iris", "retina", "vbm"})


class TokenRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    subject: str
    mfa: bool
    token_id: str


class TokenVerifier:
    def __init__(
        self, issuer: str, audience: str, jwks_url: str, leeway_s: int = 30, mfa_acr: frozenset[str] = frozenset()
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._mfa_acr = mfa_acr
        # Keys are cached and refetched when an unknown kid shows up (the IdP rotated).
        self._jwks = PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5)

    def verify(self, token: str) -> Identity:
        """Blocking (may fetch the JWKS): call from a worker thread."""
        if not token:
            raise TokenRejected("no access token")
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError:
            raise TokenRejected("malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenRejected("token algorithm not allowed")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except PyJWKClientConnectionError:
            raise TokenRejected("identity provider keys unavailable") from None
        except (PyJWKClientError, InvalidTokenError):
            raise TokenRejected("unknown signing key") from None
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except InvalidAudienceError:
            raise TokenRejected("token audience mismatch") from None
        except InvalidIssuerError:
            raise TokenRejected("token issuer mismatch") from None
        except InvalidSignatureError:
            raise TokenRejected("token signature invalid") from None
        except MissingRequiredClaimError as exc:
            raise TokenRejected(f"token lacks claim {exc.claim}") from None
        except InvalidTokenError:
            raise TokenRejected("token invalid") from None
        amr = claims.get("amr", [])
        mfa = bool(MFA_METHODS.intersection(amr if isinstance(amr, list) else [])) or claims.get("acr") in self._mfa_acr
        return Identity(subject=str(claims["sub"]), mfa=mfa, token_id=str(claims.get("jti", "")))
