"""Verifying OIDC access tokens (JWT) against the identity provider's JWKS.

Signature (RS256/ES256 only — never `none`, never a symmetric algorithm an attacker could
forge with a public key), issuer, audience, expiry and not-before with a small clock skew.
Every failure becomes a short, stable reason; nothing about the token is echoed back.

A token that verified is remembered (by its SHA-256) until the earlier of its own expiry and a
short TTL: a viewer opening a study sends the same token with hundreds of checks, and its
claims cannot change. Expiry is never extended (the leeway is not applied to remembered
tokens); the TTL bounds how long a signing key the identity provider withdrew still counts.
Failures are never remembered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

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


def require_secure_jwks_url(url: str) -> str:
    """The signing keys decide who is who: fetch them over HTTPS. Plain HTTP only on loopback
    (the local issuer of tests and the demo), where no one else is on the path."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        if parts.hostname == "localhost":
            return url
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return url
        except ValueError:
            pass
    raise ValueError(f"JWKS URL must be https:// (plain http only on loopback): {parts.scheme}://{parts.hostname}")


class TokenRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    subject: str
    mfa: bool
    token_id: str
    # Every claim of the verified token (read-only), for the policy's group/role claim: which
    # claim counts lives in the reloadable policy, so the choice is made per decision.
    claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    def claim_values(self, name: str) -> tuple[str, ...]:
        """The string values of claim ``name``: a top-level claim of that exact name (Entra ID's
        ``roles``/``groups``, namespaced URIs), else a dot-separated path into nested objects
        (Keycloak's ``realm_access.roles``). A single string counts as one value; anything that
        is not a string is ignored (it can match no mapping)."""
        if not name:
            return ()
        value: Any = self.claims.get(name)
        if value is None and "." in name:
            value = self.claims
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str):
            return (value,) if value else ()
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str) and v)
        return ()


class TokenVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str,
        leeway_s: int = 30,
        mfa_acr: frozenset[str] = frozenset(),
        remember_s: float = 60.0,
        remember_max: int = 10_000,
    ) -> None:
        self._remember_s = remember_s
        self._remember_max = remember_max
        self._verified: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        # verify() runs in worker threads, remembered() on the event loop.
        self._lock = threading.Lock()
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._mfa_acr = mfa_acr
        # Keys are cached and refetched when an unknown kid shows up (the IdP rotated).
        self._jwks = PyJWKClient(require_secure_jwks_url(jwks_url), cache_keys=True, lifespan=300, timeout=5)

    def remembered(self, token: str) -> Identity | None:
        """The identity of a token verified earlier and still within its validity; no I/O."""
        if self._remember_s <= 0:
            return None
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._verified.get(key)
            if hit is None:
                return None
            if time.time() >= hit[0]:
                del self._verified[key]
                return None
            self._verified.move_to_end(key)
            return hit[1]

    def _remember(self, token: str, identity: Identity, expires_at: float) -> None:
        if self._remember_s <= 0:
            return
        until = min(expires_at, time.time() + self._remember_s)
        with self._lock:
            self._verified[hashlib.sha256(token.encode()).digest()] = (until, identity)
            while len(self._verified) > self._remember_max:
                self._verified.popitem(last=False)

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
        identity = Identity(
            subject=str(claims["sub"]), mfa=mfa, token_id=str(claims.get("jti", "")), claims=MappingProxyType(claims)
        )
        self._remember(token, identity, float(claims["exp"]))
        return identity
