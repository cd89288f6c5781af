from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.restartable import OwnKafka, OwnMongo, PersistentBao, running_server
from tests.servers import Servers, resolve
from tests.service_runner import TEST_CLIENT
from tools.oidc_issuer import LocalIssuer, running_issuer
from tools.pki import IDENTITIES, Pki, make_pki

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The folder decides the marker, so `-m unit` never needs a server.
    for item in items:
        kind = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        yield resolve(stack)


@pytest.fixture
def unique() -> str:
    """A short random suffix, so tests sharing one cluster never see each other's data."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def idp() -> Iterator[LocalIssuer]:
    """A real OpenID Connect issuer on loopback (keys made at start) for user tokens."""
    with running_issuer() as issuer:
        yield issuer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA made for this session and a certificate for every workload identity: services in
    tests run with mutual TLS, as deployed."""
    return make_pki(tmp_path_factory.mktemp("pki"), (*IDENTITIES, TEST_CLIENT))


# Servers of a test's own that it may stop and start (tests.restartable), on its tmp_path.
@pytest.fixture
def own_bao(tmp_path: Path) -> Iterator[PersistentBao]:
    yield from running_server(PersistentBao(tmp_path / "bao"))


@pytest.fixture
def own_mongo(tmp_path: Path) -> Iterator[OwnMongo]:
    yield from running_server(OwnMongo(tmp_path / "mongo"))


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[OwnKafka]:
    yield from running_server(OwnKafka(tmp_path / "kafka"))
