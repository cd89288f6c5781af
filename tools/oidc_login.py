"""The browser sign-in of the development issuer: OAuth 2.0 authorization code with PKCE (RFC 7636,
S256 only), as a browser viewer (OHIF's oidc-client-ts) performs it against a hospital's
identity provider.

Only registered clients and their exact redirect URIs are served; users sign in with a password
set by whoever runs the issuer (never a default one); a code is single-use, bound to its client,
redirect URI and PKCE challenge, and lives 60 seconds. Token responses and user info are readable
only by the registered clients' origins (CORS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

CODE_LIFETIME_S = 60
# The sign-in session (a cookie on the issuer's origin), as an identity provider keeps one: a
# viewer that loads again is sent back with a code at once instead of asking for the password.
SESSION_LIFETIME_S = 8 * 3600
SESSION_COOKIE = "dicomsafe_dev_sid"


class LoginError(Exception):
    """A refused step, with the OAuth error code (RFC 6749 §4.1.2.1 / §5.2) and HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass(frozen=True)
class Client:
    client_id: str
    redirect_uris: frozenset[str]

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(origin_of(uri) for uri in self.redirect_uris)


@dataclass(frozen=True)
class User:
    subject: str
    password_hash: bytes
    salt: bytes
    amr: tuple[str, ...]


@dataclass(frozen=True)
class Authorization:
    """What one sign-in granted: the code's claims once it is redeemed."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    subject: str
    amr: tuple[str, ...]
    nonce: str
    scope: str
    expires_at: float


def origin_of(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


def _hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Login:
    """Clients, users and outstanding codes of one issuer (thread-safe: its HTTP server is threaded)."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._users: dict[str, User] = {}
        self._codes: dict[str, Authorization] = {}
        self._sessions: dict[str, tuple[User, float]] = {}
        self._lock = threading.Lock()

    def register_client(self, client_id: str, redirect_uris: Sequence[str]) -> None:
        self._clients[client_id] = Client(client_id, frozenset(redirect_uris))

    def add_user(self, subject: str, password: str, amr: Sequence[str] = ("pwd",)) -> None:
        if len(password) < 12:
            raise ValueError("a sign-in password has at least 12 characters")
        salt = secrets.token_bytes(16)
        self._users[subject] = User(subject, _hash_password(password, salt), salt, tuple(amr))

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset(o for c in self._clients.values() for o in c.origins)

    def client_for(self, params: Mapping[str, str]) -> tuple[Client, str]:
        """The registered client and redirect URI of an authorization request, or LoginError.

        Before a redirect URI is known to be registered, errors are shown, never redirected
        (RFC 6749 §4.1.2.1: no open redirector)."""
        client = self._clients.get(params.get("client_id", ""))
        if client is None:
            raise LoginError("unauthorized_client", "unknown client_id")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            raise LoginError("invalid_request", "redirect_uri is not registered for this client")
        return client, redirect_uri

    def check_request(self, params: Mapping[str, str]) -> None:
        """The parameters a code needs beyond client and redirect URI (errors may be redirected)."""
        if params.get("response_type") != "code":
            raise LoginError("unsupported_response_type", "only response_type=code is served")
        if "openid" not in params.get("scope", "").split():
            raise LoginError("invalid_scope", "scope must include openid")
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            raise LoginError("invalid_request", "PKCE with code_challenge_method=S256 is required")

    def sign_in(self, params: Mapping[str, str], username: str, password: str) -> tuple[str, str]:
        """A code and a new session id for a correct password, else LoginError (the same for
        unknown users)."""
        self.client_for(params)
        self.check_request(params)
        user = self._users.get(username)
        # Hash even for an unknown user: the answer's timing does not tell who exists.
        salt = user.salt if user else b"\0" * 16
        offered = _hash_password(password, salt)
        if user is None or not hmac.compare_digest(offered, user.password_hash):
            raise LoginError("access_denied", "wrong user name or password", status=401)
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = (user, time.monotonic() + SESSION_LIFETIME_S)
        return self._code(params, user), session

    def resume(self, params: Mapping[str, str], session: str) -> str | None:
        """A code for the user of a live session, or None (sign in again; also on prompt=login)."""
        self.client_for(params)
        self.check_request(params)
        if "login" in params.get("prompt", "").split():
            return None
        with self._lock:
            found = self._sessions.get(session)
        if found is None or found[1] < time.monotonic():
            return None
        return self._code(params, found[0])

    def end_session(self, session: str) -> None:
        with self._lock:
            self._sessions.pop(session, None)

    def _code(self, params: Mapping[str, str], user: User) -> str:
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = Authorization(
                client_id=params["client_id"],
                redirect_uri=params["redirect_uri"],
                code_challenge=params["code_challenge"],
                subject=user.subject,
                amr=user.amr,
                nonce=params.get("nonce", ""),
                scope=params.get("scope", ""),
                expires_at=time.monotonic() + CODE_LIFETIME_S,
            )
        return code

    def redeem(self, form: Mapping[str, str]) -> Authorization:
        """The authorization behind a token request's code, used up whatever the outcome."""
        if form.get("grant_type") != "authorization_code":
            raise LoginError("unsupported_grant_type", "only grant_type=authorization_code is served")
        with self._lock:
            granted = self._codes.pop(form.get("code", ""), None)
        if granted is None or granted.expires_at < time.monotonic():
            raise LoginError("invalid_grant", "unknown, used or expired code")
        if form.get("client_id") != granted.client_id or form.get("redirect_uri") != granted.redirect_uri:
            raise LoginError("invalid_grant", "code issued to another client or redirect_uri")
        if not hmac.compare_digest(s256(form.get("code_verifier", "")), granted.code_challenge):
            raise LoginError("invalid_grant", "code_verifier does not match the code_challenge")
        return granted


def redirect_with(redirect_uri: str, params: Mapping[str, str]) -> str:
    return f"{redirect_uri}{'&' if '?' in redirect_uri else '?'}{urlencode(params)}"


def login_page(params: Mapping[str, str], failed: bool = False) -> bytes:
    """A sign-in form that posts the authorization request back with the credentials."""
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in params.items()
    )
    notice = '<p id="error" role="alert">Wrong user name or password.</p>' if failed else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dicomsafe development sign-in</title></head>
<body><h1>dicomsafe development sign-in</h1>{notice}
<form method="post" action="/authorize">{hidden}
<label>User <input id="username" name="username" autocomplete="username" required></label>
<label>Password <input id="password" name="password" type="password" autocomplete="current-password"
required></label>
<button id="sign-in" type="submit">Sign in</button></form></body></html>"""
    return page.encode()
