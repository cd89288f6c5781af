"""A stable name for an access token that is safe to store: what the audit trail records so a
leaked credential can be traced ("which patients did this token reach?") without the trail
ever holding a usable token. One definition, used by authz when it records a decision and by
audit when it is asked about a token."""

from __future__ import annotations

import hashlib

# 128 bits: collision-free in practice for every token a hospital will ever issue, and a
# token's own entropy means the prefix reveals nothing that could be turned back into it.
_HEX_CHARS = 32


def token_fingerprint(access_token: str) -> str:
    """SHA-256 prefix of the token as sent (whitespace-trimmed); empty for no token."""
    token = access_token.strip()
    if not token:
        return ""
    return hashlib.sha256(token.encode()).hexdigest()[:_HEX_CHARS]
