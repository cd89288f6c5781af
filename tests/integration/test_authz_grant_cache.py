"""Checks answer grants from memory (authz/grant_cache.py), and that memory is never staler than
the poll interval: two authz replicas on one grant store, a change made through one is in
force on the other within ``AUTHZ_GRANT_CACHE_POLL_MS``; with the store gone, cached grants stop
counting (the check decides without grants, as it always did without the store)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import authz_pb2, authz_pb2_grpc
from tests.restartable import OwnMongo
from tests.servers import Servers
from tests.service_runner import authz_config, running_authz
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = authz_pb2_grpc.AuthzServiceAsyncStub

STUDY = "1.2.840.10008.77"
POLL_MS = 250


def _who(idp: LocalIssuer, subject: str) -> authz_pb2.Subject:
    return authz_pb2.Subject(access_token=idp.token(subject, amr=["pwd"]))


async def _allowed(stub: Stub, idp: LocalIssuer, subject: str) -> bool:
    request = authz_pb2.CheckRequest(
        subject=_who(idp, subject),
        action="instance.read",
        resource=authz_pb2.Resource(type="instance", study_instance_uid=STUDY),
    )
    return bool((await stub.Check(request)).allow)


async def _within(seconds: float, condition: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``condition`` held (polled as fast as checks answer); fails after ``seconds``."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
    return time.monotonic() - started


def _grant(subject: str) -> authz_pb2.Grant:
    now = dt.datetime.now(dt.UTC)
    grant = authz_pb2.Grant(subject=subject, role="radiologist", study_instance_uid=STUDY, reason="locum cover")
    grant.not_before.FromDatetime(now - dt.timedelta(minutes=1))
    grant.not_after.FromDatetime(now + dt.timedelta(hours=2))
    return grant


async def _topics(servers: Servers, unique: str) -> Topics:
    topics = Topics(f"gc{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    return topics


async def test_a_change_on_one_replica_is_in_force_on_the_other_within_the_poll(
    pki: Pki, servers: Servers, idp: LocalIssuer, unique: str
) -> None:
    topics = await _topics(servers, unique)
    store = {"mongodb_uri": servers.mongodb_uri, "mongodb_db": f"authz_gc_{unique}", "grant_cache_poll_ms": POLL_MS}
    a_cfg = authz_config(servers.kafka_bootstrap, topics.prefix, idp, **store)
    b_cfg = authz_config(servers.kafka_bootstrap, topics.prefix, idp, **store)
    admin = _who(idp, "reg.omar")
    async with running_authz(a_cfg, pki) as a, running_authz(b_cfg, pki) as b:
        # B has cached the locum's (empty) grants: warm, as under load.
        for _ in range(20):
            assert not await _allowed(b, idp, "dr.locum")
        created = await a.CreateGrant(authz_pb2.CreateGrantRequest(caller=admin, grant=_grant("dr.locum")))
        assert await _allowed(a, idp, "dr.locum")  # at once where it was made
        seen_in = await _within(2 * POLL_MS / 1000 + 1, lambda: _allowed(b, idp, "dr.locum"))
        for _ in range(20):
            assert await _allowed(b, idp, "dr.locum")  # answered from the refilled cache

        await a.RevokeGrant(authz_pb2.RevokeGrantRequest(caller=admin, grant_id=created.grant_id, reason="left"))
        assert not await _allowed(a, idp, "dr.locum")

        async def refused_on_b() -> bool:
            return not await _allowed(b, idp, "dr.locum")

        revoked_in = await _within(2 * POLL_MS / 1000 + 1, refused_on_b)
        print(f"grant seen on the other replica in {seen_in:.3f} s, revocation in {revoked_in:.3f} s")


async def test_cached_grants_stop_counting_when_the_store_is_gone(
    pki: Pki, servers: Servers, idp: LocalIssuer, unique: str, own_mongo: OwnMongo
) -> None:
    topics = await _topics(servers, unique)
    cfg = authz_config(
        servers.kafka_bootstrap,
        topics.prefix,
        idp,
        mongodb_uri=own_mongo.uri,
        mongodb_db=f"authz_gc_{unique}",
        grant_cache_poll_ms=POLL_MS,
    )
    async with running_authz(cfg, pki) as stub:
        await stub.CreateGrant(authz_pb2.CreateGrantRequest(caller=_who(idp, "reg.omar"), grant=_grant("dr.locum")))
        for _ in range(20):
            assert await _allowed(stub, idp, "dr.locum")
        own_mongo.stop()
        try:
            # The poller cannot confirm the generation: the cache is out of use within about two
            # polls, and without the store a grant confers nothing.
            async def refused() -> bool:
                return not await _allowed(stub, idp, "dr.locum")

            await _within(10, refused)
            for _ in range(5):
                assert not await _allowed(stub, idp, "dr.locum")
        finally:
            own_mongo.start()
        await _within(20, lambda: _allowed(stub, idp, "dr.locum"))  # and back once it is
