"""Which DICOM peers (modalities, PACS, workstations) may open an association with one of our
DIMSE listeners: ingest's storage AE and the gateway's query/retrieve AE.

A peer is admitted only when all of these match one configured entry: its calling AE title,
the identity in its TLS client certificate (verified against our CA during the handshake), its
source address, and the TLS version it negotiated (1.3, unless the entry names 1.2 as its
documented exception). Anything else is refused (deny by default), with a reason for the audit
trail that names what did not match but never echoes certificate contents.

The file (``INGEST_DIMSE_PEERS_FILE``, ``GATEWAY_DIMSE_PEERS_FILE``) is JSON::

    {"peers": [{"name": "modality-ct1", "ae_title": "CT1", "certificate": "modality-ct1",
                "addresses": ["10.20.0.0/24"], "services": ["echo", "store"]},
               {"name": "reading-ws1", "ae_title": "WS1", "certificate": "reading-ws1",
                "addresses": ["10.30.0.7/32"], "services": ["echo", "find", "get", "move"],
                "store_scp": "10.30.0.7:11112", "move_destinations": ["reading-ws1"]}]}

``store_scp`` is where a peer takes C-STOREs: it makes the peer a possible C-MOVE destination
(reached over the same mutual TLS, its certificate checked as on admission). A peer may move
only to the destinations its own ``move_destinations`` names.

``certificate`` matches the certificate's subject CN or one of its URI/DNS SANs, so both a
hospital PKI's CN and a SPIFFE id (``spiffe://dicomsafe/<name>``) can name the peer.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomsafe.common.config import ConfigError, host_port

# DIMSE services a peer may be granted; a peer granted none of them cannot do anything.
SERVICES = frozenset({"echo", "store", "find", "get", "move"})
TLS13 = "TLSv1.3"
TLS12 = "TLSv1.2"
# PS3.8 9.3.2.1: an AE title is at most 16 characters of the default repertoire, no backslash.
MAX_AE_TITLE = 16
# authz subjects of peers are "dimse:<name>": no user id of the identity provider looks like it.
PRINCIPAL_PREFIX = "dimse:"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    # Names the peer in this file; its principal (audit actor, authz subject) is "dimse:<name>".
    name: str
    ae_title: str
    certificate: str
    addresses: tuple[Network, ...]
    services: frozenset[str]
    # TLS 1.2 for this peer only (an older modality); documented per peer, never a default.
    allow_tls12: bool = False
    # Where the peer takes C-STOREs as an SCP (host, port), when it may be a C-MOVE destination.
    store_scp: tuple[str, int] | None = None
    # Names of the peers this one may C-MOVE to.
    move_destinations: frozenset[str] = frozenset()

    @property
    def principal(self) -> str:
        """The subject authz decides about for this peer (its roles are in the policy file)."""
        return f"{PRINCIPAL_PREFIX}{self.name}"

    def admits_address(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.addresses)


@dataclass(frozen=True)
class Refusal:
    # What did not match, for the audit trail and the log: no certificate contents, no PHI.
    reason: str
    # A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
    result: int
    source: int
    diagnostic: int


# Rejected-permanent by the service user: calling AE title not recognised / no reason given.
_UNKNOWN_AE = (0x01, 0x01, 0x03)
_REFUSED = (0x01, 0x01, 0x01)


@dataclass(frozen=True)
class CertificateIdentity:
    """The names a verified client certificate carries (what ``certificate`` is matched against)."""

    names: frozenset[str]

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> CertificateIdentity:
        """From ``SSLSocket.getpeercert()`` of a verified peer ({} or None: no certificate)."""
        names: set[str] = set()
        if cert:
            for rdn in cert.get("subject", ()):
                names.update(str(value) for key, value in rdn if key == "commonName")
            names.update(str(value) for kind, value in cert.get("subjectAltName", ()) if kind in ("URI", "DNS"))
        return cls(frozenset(names))


class PeerDirectory:
    def __init__(self, peers: Sequence[Peer]) -> None:
        titles = [p.ae_title for p in peers]
        if len(set(titles)) != len(titles):
            raise ConfigError("DIMSE peers: each AE title may be configured once")
        names = {p.name: p for p in peers}
        if len(names) != len(peers):
            raise ConfigError("DIMSE peers: each name may be configured once")
        for peer in peers:
            for destination in sorted(peer.move_destinations):
                if names.get(destination) is None or names[destination].store_scp is None:
                    raise ConfigError(
                        f"DIMSE peer {peer.name}: move destination {destination!r} is not a peer with a store_scp"
                    )
        self._by_title = {p.ae_title: p for p in peers}
        self._by_name = names

    @property
    def peers(self) -> Iterable[Peer]:
        return self._by_title.values()

    @property
    def any_tls12(self) -> bool:
        """Whether the listener must offer TLS 1.2 at all (then only those peers may use it)."""
        return any(p.allow_tls12 for p in self.peers)

    @classmethod
    def load(cls, path: Path) -> PeerDirectory:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read DIMSE peers file ({path}): {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"DIMSE peers file ({path}) is not JSON: line {exc.lineno}") from exc
        entries = document.get("peers") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"DIMSE peers file ({path}) needs a 'peers' list")
        return cls([_peer(entry, i) for i, entry in enumerate(entries)])

    def move_destination(self, requestor: Peer, ae_title: str) -> Peer | None:
        """The peer ``requestor`` may C-MOVE to under this AE title, or None (unknown or not allowed)."""
        peer = self._by_title.get(ae_title.strip())
        if peer is None or peer.name not in requestor.move_destinations:
            return None
        return peer

    def admit(self, calling_ae: str, address: str, identity: CertificateIdentity, tls_version: str) -> Peer | Refusal:
        """The configured peer this association comes from, or why it is refused."""
        peer = self._by_title.get(calling_ae.strip())
        if peer is None:
            return Refusal("unknown calling AE title", *_UNKNOWN_AE)
        if peer.certificate not in identity.names:
            return Refusal("client certificate is not the one configured for this AE title", *_REFUSED)
        if not peer.admits_address(address):
            return Refusal("source address not allowed for this AE title", *_REFUSED)
        if tls_version != TLS13 and not (tls_version == TLS12 and peer.allow_tls12):
            return Refusal(f"TLS version {tls_version or 'none'} not allowed for this AE title", *_REFUSED)
        return peer


_KEYS = frozenset(
    {"name", "ae_title", "certificate", "addresses", "services", "allow_tls12", "store_scp", "move_destinations"}
)


def _peer(entry: object, index: int) -> Peer:
    where = f"DIMSE peer #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not an object")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    name, title, cert = (str(entry.get(k, "")).strip() for k in ("name", "ae_title", "certificate"))
    if not name or not title or not cert:
        raise ConfigError(f"{where} needs name, ae_title and certificate")
    if len(title) > MAX_AE_TITLE or "\\" in title or not title.isprintable():
        raise ConfigError(f"{where}: {title!r} is not a valid AE title")
    addresses = entry.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        # No "any address" default: a stolen certificate must not work from everywhere.
        raise ConfigError(f"{where} needs a non-empty 'addresses' list (CIDR blocks)")
    try:
        networks = tuple(ipaddress.ip_network(str(a), strict=False) for a in addresses)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    services = frozenset(str(s) for s in entry.get("services", ()))
    if not services or not services <= SERVICES:
        raise ConfigError(f"{where}: 'services' must be a non-empty subset of {sorted(SERVICES)}")
    allow_tls12 = entry.get("allow_tls12", False)
    if not isinstance(allow_tls12, bool):
        raise ConfigError(f"{where}: 'allow_tls12' must be true or false")
    store_scp = None
    if "store_scp" in entry:
        try:
            store_scp = host_port(str(entry["store_scp"]))
        except ConfigError as exc:
            raise ConfigError(f"{where}: store_scp: {exc}") from None
    destinations = entry.get("move_destinations", [])
    if not isinstance(destinations, list) or not all(isinstance(d, str) and d for d in destinations):
        raise ConfigError(f"{where}: 'move_destinations' must be a list of peer names")
    if destinations and "move" not in services:
        raise ConfigError(f"{where}: 'move_destinations' without the 'move' service")
    return Peer(name, title, cert, networks, services, allow_tls12, store_scp, frozenset(destinations))
