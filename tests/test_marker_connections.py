"""The transaction marker writer keeps its connections to other brokers: on a SASL_SSL
inter-broker listener a commit costs no TLS handshake and no SCRAM login, counted by the
brokers' own ``streambus_authentication_attempts_total``.

The pool's rules against one real broker (SASL_PLAINTEXT, SCRAM-SHA-512): concurrent
requests never share a connection, a connection is dialed again when its session ends, when
the broker's address changes and after a failure, and connections to brokers gone from the
cluster, or all of them at stop, are closed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from confluent_kafka import Producer
from kafka.protocol.metadata import MetadataRequest, MetadataResponse

from streambus.security.broker_client import BrokerDialer, InterBrokerSecurity
from streambus.security.listeners import SecurityProtocol
from streambus.transactions.markers import Leader, MarkerConnections
from tests.harness import BrokerThread, scrape, total, wait_until
from tests.test_security_auth import add_user
from tests.test_security_inter_broker import ASSIGNMENT, MECHANISM, SecureCluster

ATTEMPTS = "streambus_authentication_attempts_total"
USER, PASSWORD = "broker", "broker-pool-secret"


def logins(b: BrokerThread) -> float:
    return total(b.scrape(), ATTEMPTS, mechanism=MECHANISM)


def test_kept_connections_serialize_redial_and_close(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", listeners="SASL_PLAINTEXT://127.0.0.1:0") as b:
        add_user(b, USER, PASSWORD)
        port = b.broker.listener_port("SASL_PLAINTEXT")
        here = Leader(1, "127.0.0.1", port)
        dialer = BrokerDialer(
            InterBrokerSecurity(SecurityProtocol.SASL_PLAINTEXT, MECHANISM, USER, PASSWORD)
        )

        def logins_become(want: float) -> None:
            wait_until(lambda: logins(b) == want, timeout=10)

        async def metadata(pool: MarkerConnections, leader: Leader, topic: str) -> str:
            async with pool.lease(leader, 10) as conn:
                request = MetadataRequest(
                    topics=[MetadataRequest.MetadataRequestTopic(name=topic)],
                    allow_auto_topic_creation=False,
                )
                response = await conn.request(request, MetadataResponse, 9, "pool-test")
            return str(response.topics[0].name)

        async def scenario() -> None:
            pool = MarkerConnections(dialer, "pool-test", size=3)
            # 24 concurrent requests: each answer is its own request's (no interleaved
            # frames), over 3 connections, so 3 logins
            names = [f"t{i}" for i in range(24)]
            answers = await asyncio.gather(*(metadata(pool, here, n) for n in names))
            assert answers == names
            assert len(pool) == 3
            await asyncio.to_thread(logins_become, 3)
            for i in range(10):  # one after another: one kept connection, no new login
                assert await metadata(pool, here, f"s{i}") == f"s{i}"
            assert len(pool) == 3
            await asyncio.to_thread(logins_become, 3)

            # its session about to end: closed when given back, the next one redialed
            async with pool.lease(here, 10) as conn:
                conn.expires_at = time.monotonic() - 1
            assert len(pool) == 2
            # a request that fails in flight closes its connection
            try:
                async with pool.lease(here, 10):
                    raise TimeoutError
            except TimeoutError:
                pass
            assert len(pool) == 1
            await asyncio.gather(*(metadata(pool, here, f"u{i}") for i in range(6)))
            assert len(pool) == 3
            await asyncio.to_thread(logins_become, 5)

            # the broker registers another address: the old connections go, one is dialed there
            moved = Leader(1, "localhost", port)
            assert await metadata(pool, moved, "m") == "m"
            assert len(pool) == 1
            await asyncio.to_thread(logins_become, 6)

            # the broker left the cluster: its connections are closed
            await pool.retain(lambda broker_id: broker_id != 1)
            assert len(pool) == 0
            assert await metadata(pool, here, "back") == "back"
            await pool.retain(lambda broker_id: broker_id == 1)
            assert len(pool) == 1

            # stop: every kept connection closed, and one in use closed when given back
            async with pool.lease(here, 10):
                await pool.close()
                assert len(pool) == 0
            assert len(pool) == 0
            await asyncio.to_thread(logins_become, 7)

        asyncio.run(scenario())


COMMITS = 20


def test_transaction_commits_reuse_inter_broker_logins(tmp_path: Path) -> None:
    """Each commit ends in three partitions led by three brokers, so the coordinator sends
    WriteTxnMarkers to two others every time: dialed per call, that was a TLS handshake and
    a SCRAM login per broker per commit."""
    with SecureCluster(tmp_path) as secure:
        secure.create_topic("secure-pool", ASSIGNMENT)
        brokers = secure.cluster.brokers.values()
        producer = Producer(secure.client_config(**{"transactional.id": "secure-pool-1"}))
        producer.init_transactions(30)

        def commit(round_: int) -> None:
            producer.begin_transaction()
            for p in range(3):
                producer.produce("secure-pool", f"r{round_}-p{p}".encode(), partition=p)
            producer.commit_transaction(30)

        commit(0)  # the producer's own connections and logins, the markers' first dials

        def scram_logins() -> float:
            return sum(total(scrape(b.metrics_url), ATTEMPTS, mechanism=MECHANISM) for b in brokers)

        before = scram_logins()
        for round_ in range(1, COMMITS + 1):
            commit(round_)
        after = scram_logins()
        # a connection dialed per WriteTxnMarkers call logged in at least once per commit
        # here (20 for 20 commits when measured); kept connections log in no more, the
        # slack is for a fetcher that reconnected meanwhile
        assert after - before <= 2, (before, after)

        seen = secure.read_committed("secure-pool", 3, 3 * (COMMITS + 1))
        want = {f"r{r}-p{p}".encode() for r in range(COMMITS + 1) for p in range(3)}
        assert set(seen) == want
