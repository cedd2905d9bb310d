"""Per-address connection creation rates (KIP-612): `ip` quota entities altered and
described in raw frames and through Kafka 4.4's `kafka-configs --entity-type ips`, and
enforced on accept: connections opened faster than the quota are held unread and closed
unanswered, counted in `streambus_connections_rejected_total`."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.admin import AlterClientQuotasRequest as A
from kafka.protocol.metadata import ApiVersionsRequest

from tests.harness import BrokerThread, RawClient, total
from tests.test_kafka_tools import CONFIGS, Tools, kafka_tools  # noqa: F401 - the jars' fixture
from tests.test_quotas import alter, describe

INVALID_REQUEST = 42
RATE = 5  # connections per second
# Two one-second samples: a new address may open about RATE connections at once.
WINDOW = {"quota_window_num": 2, "quota_window_size_seconds": 1.0}
MATCH_EXACT, MATCH_DEFAULT, MATCH_ANY = 0, 1, 2


class SourcedClient(RawClient):
    """A raw connection from a chosen loopback address (127.0.0.2 is loopback too)."""

    def __init__(self, bootstrap: str, source: str, timeout: float = 10) -> None:
        host, port = bootstrap.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout, (source, 0))
        self._correlation = 0


def alter_from(
    bootstrap: str, source: str, entity: list[tuple[str, str | None]], rate: float
) -> None:
    """Set ``entity``'s connection rate over a connection from ``source``: the test's
    own address may be the one being throttled."""
    request = A(
        entries=[
            A.EntryData(
                entity=[A.EntryData.EntityData(entity_type=t, entity_name=n) for t, n in entity],
                ops=[A.EntryData.OpData(key="connection_creation_rate", value=rate, remove=False)],
            )
        ],
        validate_only=False,
    )
    with SourcedClient(bootstrap, source) as client:
        assert client.request(request, 1).entries[0].error_code == 0


def burst(
    bootstrap: str, count: int, source: str | tuple[str, ...] = "127.0.0.1"
) -> tuple[int, int, float]:
    """Open ``count`` connections one after another (from the addresses in turn), each
    asking ApiVersions, then read every answer: (answered, closed unanswered, seconds the
    opening took)."""
    sources = (source,) if isinstance(source, str) else source
    clients: list[SourcedClient] = []
    start = time.monotonic()
    try:
        for i in range(count):
            client = SourcedClient(bootstrap, sources[i % len(sources)], timeout=30)
            request = ApiVersionsRequest()
            request.with_header(correlation_id=1, client_id="burst")
            client.send_bytes(bytes(request.encode(version=0, header=True, framed=True)))
            clients.append(client)
        took = time.monotonic() - start
        answered = refused = 0
        for client in clients:
            try:
                client.read_response(ApiVersionsRequest, 0)
            except (ConnectionError, OSError):
                refused += 1
            else:
                answered += 1
        return answered, refused, took
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        yield b


def test_ip_entities_altered_described_and_validated(broker: BrokerThread) -> None:
    boot = broker.bootstrap
    rate = {"connection_creation_rate": 7.0}
    assert alter(boot, [("ip", "10.0.0.1")], rate).entries[0].error_code == 0
    many = {"connection_creation_rate": 1000.0}  # a default that spares the test's own
    assert alter(boot, [("ip", None)], many).entries[0].error_code == 0
    # one form per address: the IPv6 loopback spelled long is the same entity as "::1"
    assert alter(boot, [("ip", "0:0:0:0:0:0:0:1")], rate).entries[0].error_code == 0
    assert describe(boot, [("ip", MATCH_ANY, None)]) == {
        (("ip", None),): many,
        (("ip", "10.0.0.1"),): rate,
        (("ip", "::1"),): rate,
    }
    assert describe(boot, [("ip", MATCH_EXACT, "10.0.0.1")]) == {(("ip", "10.0.0.1"),): rate}
    assert describe(boot, [("ip", MATCH_EXACT, "0::1")]) == {(("ip", "::1"),): rate}
    assert list(describe(boot, [("ip", MATCH_DEFAULT, None)])) == [(("ip", None),)]
    assert describe(boot, [("client-id", MATCH_ANY, None)]) == {}  # ip entries are apart

    refused: list[tuple[list[tuple[str, str | None]], dict[str, float | None]]] = [
        ([("ip", "10.0.0.1"), ("user", "u")], rate),  # an ip is never combined
        ([("ip", "not-an-address")], rate),
        ([("ip", "10.0.0.1")], {"producer_byte_rate": 100.0}),  # not a quota of an ip
        ([("client-id", "c")], rate),  # nor a connection rate of a client
        ([("ip", "10.0.0.1")], {"connection_creation_rate": 2.5}),  # Kafka's INT
    ]
    for entity, ops in refused:
        entry = alter(boot, entity, ops).entries[0]
        assert entry.error_code == INVALID_REQUEST, (entity, ops)
        assert entry.error_message, (entity, ops)
    assert alter(boot, [("ip", "10.0.0.1")], {"connection_creation_rate": None}).entries[0]
    assert (("ip", "10.0.0.1"),) not in describe(boot, [("ip", MATCH_ANY, None)])


def _rejected(broker: BrokerThread) -> float:
    s = broker.scrape()
    return total(s, "streambus_connections_rejected_total", reason="connection_creation_rate")


def test_connections_over_the_ip_rate_are_closed_unanswered(broker: BrokerThread) -> None:
    boot = broker.bootstrap
    answered, refused, _ = burst(boot, 20)
    assert (answered, refused) == (20, 0)  # no quota yet
    assert alter(boot, [("ip", "127.0.0.1")], {"connection_creation_rate": RATE}).entries

    answered, refused, took = burst(boot, 30)
    # The rate is measured over at least one window: the connections let in over the
    # burst cannot exceed the quota over the time it took plus the measured window.
    assert 1 <= answered <= RATE * (took + 2) + 1, (answered, refused, took)
    assert refused == 30 - answered
    assert refused >= 1
    assert _rejected(broker) == refused  # each refused connection counted once
    s = broker.scrape()
    observed = total(s, "streambus_throttle_time_seconds_count", type="connection")
    assert observed == 30  # one observation per connection from an address with a quota

    # Another address has no quota of its own and no default one applies yet.
    answered2, refused2, _ = burst(boot, 20, source="127.0.0.2")
    assert (answered2, refused2) == (20, 0)
    # The default ip quota is a rate per address: 127.0.0.2 now has one of its own.
    alter_from(boot, "127.0.0.3", [("ip", None)], RATE)
    answered3, refused3, took3 = burst(boot, 30, source="127.0.0.2")
    assert 1 <= answered3 <= RATE * (took3 + 2) + 1, (answered3, took3)
    assert refused3 >= 1
    assert _rejected(broker) == refused + refused3


def test_a_refused_connection_is_held_then_closed(broker: BrokerThread) -> None:
    """The refused socket is accepted, never read and closed after its throttle time, so
    the broker's own state holds nothing of it afterwards."""
    alter(broker.bootstrap, [("ip", "127.0.0.1")], {"connection_creation_rate": 1})
    clients = [RawClient(broker.bootstrap) for _ in range(6)]
    try:
        closed = [c.is_closed_by_peer(wait=10) for c in clients]
        assert closed.count(True) >= 1, closed  # the refused ones, closed by the broker
        assert closed.count(False) >= 1, closed  # the admitted ones wait for a request
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def tools(kafka_tools: Path, broker: BrokerThread) -> Tools:  # noqa: F811 - the import's use
    return Tools(kafka_tools, broker)


@pytest.mark.slow
def test_kafka_configs_ips_connection_creation_rate(tools: Tools, broker: BrokerThread) -> None:
    entity = ("--entity-type", "ips", "--entity-name", "127.0.0.1")
    altered = tools.configs("--alter", *entity, "--add-config", f"connection_creation_rate={RATE}")
    assert "Completed updating config for ip 127.0.0.1." in altered.stdout, altered
    described = tools.configs("--describe", *entity)
    assert f"connection_creation_rate={RATE}" in described.stdout, described
    assert "'127.0.0.1'" in described.stdout, described
    default = tools.configs(
        "--alter", "--entity-type", "ips", "--entity-default", "--add-config",
        "connection_creation_rate=50",
    )  # fmt: skip
    assert "Completed updating default config for ips" in default.stdout, default
    everyone = tools.configs("--describe", "--entity-type", "ips")
    assert "connection_creation_rate=50" in everyone.stdout, everyone

    answered, refused, took = burst(broker.bootstrap, 40)
    assert 1 <= answered <= RATE * (took + 2) + 1, (answered, refused, took)
    assert refused == 40 - answered >= 1
    assert _rejected(broker) == refused

    run = _until_accepted(tools, "--alter", *entity, "--delete-config", "connection_creation_rate")
    assert "Completed updating config for ip 127.0.0.1." in run.stdout, run
    answered, refused, _ = burst(broker.bootstrap, 10)
    assert (answered, refused) == (10, 0)  # only the default's 50 per second applies now


def _until_accepted(tools: Tools, *args: str) -> Any:
    """kafka-configs once the burst's refused connections have aged out of the quota's
    window (the tool's own connections come from the throttled address)."""
    deadline = time.monotonic() + 60
    while True:
        run = tools.run(CONFIGS, "--bootstrap-server", tools.bootstrap, *args)
        if run.returncode == 0 or time.monotonic() > deadline:
            assert run.returncode == 0, run
            return run


def test_broker_wide_connection_rate_spans_addresses(tmp_path: Path) -> None:
    """``max.connection.creation.rate`` counts every address together: a burst from two
    addresses in turn, neither with an ip quota, is held to the broker's one rate (per
    address, twice as many would get in)."""
    with BrokerThread(tmp_path / "data", max_connection_creation_rate=RATE, **WINDOW) as b:
        answered, refused, took = burst(b.bootstrap, 30, source=("127.0.0.1", "127.0.0.2"))
        assert answered + refused == 30
        assert 1 <= answered <= RATE * (took + 2) + 1, (answered, refused, took)
        assert refused >= 1
        s = b.scrape()
        rejected = total(
            s, "streambus_connections_rejected_total", reason="max_connection_creation_rate"
        )
        assert rejected == refused  # each refused connection counted once, by its reason
        assert _rejected(b) == 0  # no ip quota refused any
