"""Who may open a DIMSE association: every part of a configured peer must match, or it is refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from dicomsafe.common.config import ConfigError
from dicomsafe.dimse.peers import CertificateIdentity, Peer, PeerDirectory, Refusal

CT: dict[str, object] = {
    "name": "modality-ct1",
    "ae_title": "CT1",
    "certificate": "ct1.hospital.example",
    "addresses": ["10.20.0.0/24"],
    "services": ["echo", "store"],
}
OLD_US: dict[str, object] = {**CT, "name": "us-cart", "ae_title": "US_OLD", "certificate": "spiffe://dicomsafe/us-cart"}
OLD_US["allow_tls12"] = True


def _directory(tmp_path: Path, *peers: Mapping[str, object]) -> PeerDirectory:
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"peers": list(peers)}))
    return PeerDirectory.load(path)


def _cert(cn: str = "", uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> CertificateIdentity:
    # The shape of ssl.SSLSocket.getpeercert() for a verified peer.
    subject = ((("commonName", cn),),) if cn else ()
    sans = tuple(("URI", u) for u in uris) + tuple(("DNS", d) for d in dns)
    return CertificateIdentity.from_peercert({"subject": subject, "subjectAltName": sans})


def test_a_configured_peer_is_admitted(tmp_path: Path) -> None:
    peers = _directory(tmp_path, CT, OLD_US)
    admitted = peers.admit("CT1", "10.20.0.7", _cert(cn="ct1.hospital.example"), "TLSv1.3")
    assert isinstance(admitted, Peer) and admitted.name == "modality-ct1"
    assert admitted.services == frozenset({"echo", "store"})
    # A SPIFFE id in a URI SAN names a peer as well as a subject CN does.
    us = peers.admit("US_OLD", "10.20.0.8", _cert(cn="other", uris=("spiffe://dicomsafe/us-cart",)), "TLSv1.3")
    assert isinstance(us, Peer) and us.name == "us-cart"
    assert peers.any_tls12


@pytest.mark.parametrize(
    ("calling", "address", "cert", "version", "reason"),
    [
        ("CT9", "10.20.0.7", _cert(cn="ct1.hospital.example"), "TLSv1.3", "unknown calling AE title"),
        ("CT1", "10.20.0.7", _cert(cn="us.hospital.example"), "TLSv1.3", "client certificate"),
        ("CT1", "10.20.0.7", _cert(), "TLSv1.3", "client certificate"),
        ("CT1", "10.99.0.7", _cert(cn="ct1.hospital.example"), "TLSv1.3", "source address"),
        ("CT1", "not-an-ip", _cert(cn="ct1.hospital.example"), "TLSv1.3", "source address"),
        ("CT1", "10.20.0.7", _cert(cn="ct1.hospital.example"), "TLSv1.2", "TLS version TLSv1.2"),
        ("CT1", "10.20.0.7", _cert(cn="ct1.hospital.example"), "", "TLS version none"),
    ],
)
def test_anything_that_does_not_match_is_refused(
    tmp_path: Path, calling: str, address: str, cert: CertificateIdentity, version: str, reason: str
) -> None:
    verdict = _directory(tmp_path, CT, OLD_US).admit(calling, address, cert, version)
    assert isinstance(verdict, Refusal)
    assert verdict.reason.startswith(reason)
    # A-ASSOCIATE-RJ: rejected-permanent by the service user.
    assert (verdict.result, verdict.source) == (0x01, 0x01)


def test_tls12_only_for_the_peer_with_the_exception(tmp_path: Path) -> None:
    peers = _directory(tmp_path, CT, OLD_US)
    old = peers.admit("US_OLD", "10.20.0.8", _cert(uris=("spiffe://dicomsafe/us-cart",)), "TLSv1.2")
    assert isinstance(old, Peer)
    assert not _directory(tmp_path, CT).any_tls12


@pytest.mark.parametrize(
    "bad",
    [
        {**CT, "addresses": []},
        {**CT, "addresses": ["10.20.0.300/24"]},
        {**CT, "services": ["store", "print"]},
        {**CT, "store_scp": "no-port"},
        {**CT, "move_destinations": ["ct1"]},
        {**CT, "services": ["move"], "move_destinations": "ct1"},
        {**CT, "services": []},
        {**CT, "ae_title": "A_TITLE_LONGER_THAN_16"},
        {**CT, "ae_title": "BACK\\SLASH"},
        {**CT, "certificate": ""},
        {**CT, "allow_tls12": "yes"},
        {**CT, "roles": ["radiologist"]},
    ],
)
def test_invalid_peer_entries_are_configuration_errors(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _directory(tmp_path, bad)


def test_an_ae_title_is_configured_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="once"):
        _directory(tmp_path, CT, {**CT, "name": "another"})


def test_an_unreadable_or_shapeless_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        PeerDirectory.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        PeerDirectory.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="'peers' list"):
        PeerDirectory.load(tmp_path / "list.json")


WS: dict[str, object] = {
    "name": "reading-ws1",
    "ae_title": "WS1",
    "certificate": "reading-ws1",
    "addresses": ["10.30.0.7/32"],
    "services": ["find", "get", "move"],
    "store_scp": "10.30.0.7:11112",
    "move_destinations": ["reading-ws1"],
}


def test_move_goes_only_to_destinations_the_requestor_names(tmp_path: Path) -> None:
    archive = {**CT, "name": "archive", "ae_title": "ARCHIVE", "store_scp": "[fd00::5]:104"}
    peers = _directory(tmp_path, WS, archive, {**CT, "ae_title": "CT1"})
    ws = peers.admit("WS1", "10.30.0.7", _cert(cn="reading-ws1"), "TLSv1.3")
    assert isinstance(ws, Peer) and ws.principal == "dimse:reading-ws1"
    own = peers.move_destination(ws, "WS1 ")
    assert own is not None and own.store_scp == ("10.30.0.7", 11112)
    # A configured peer with a store SCP, but not one WS1 may send to; and an unknown title.
    assert peers.move_destination(ws, "ARCHIVE") is None
    assert peers.move_destination(ws, "NOSUCH") is None


@pytest.mark.parametrize(
    "destinations",
    [["nobody"], ["modality-ct1"]],  # not configured; configured but takes no C-STOREs
)
def test_move_destinations_must_be_peers_with_a_store_scp(tmp_path: Path, destinations: list[str]) -> None:
    with pytest.raises(ConfigError, match="move destination"):
        _directory(tmp_path, CT, {**WS, "move_destinations": destinations})


def test_a_name_is_configured_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name may be configured once"):
        _directory(tmp_path, CT, {**CT, "ae_title": "CT2"})


def test_a_listener_without_tls_is_a_configuration_error(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer

    from dicomsafe.common.audit_emitter import AuditEmitter
    from dicomsafe.dimse.associations import DimseServer, ListenerSettings

    settings = ListenerSettings("127.0.0.1", 0, "DICOMSAFE", _directory(tmp_path, CT))
    # Refused while being built, before anything connects: the producer is never started.
    audit = AuditEmitter(AIOKafkaProducer.__new__(AIOKafkaProducer), "ingest", "audit.events")
    with pytest.raises(ConfigError, match="needs TLS"):
        DimseServer(settings, None, audit)
