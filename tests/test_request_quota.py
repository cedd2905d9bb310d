"""Request quotas (KIP-124) through real sockets: a client id with ``request_percentage=1``
sending Metadata, ListOffsets and Produce back to back is throttled and muted, another
client id is not, ApiVersions is not counted, the throttle reaches
``streambus_throttle_time_seconds{type="request"}`` through a real scrape; and Kafka's
``kafka-configs`` sets and describes the quota."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from kafka.protocol.consumer import ListOffsetsRequest as L
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest
from kafka.protocol.producer import ProduceRequest as P

from bench.kafka import ensure_kafka_tools
from streambus.records.batch import build_batch
from tests.harness import BrokerThread, RawClient, fetch_request, total
from tests.test_kafka_tools import Tools
from tests.test_quotas import alter

WINDOW = {"quota_window_num": 2, "quota_window_size_seconds": 1.0}
TOPIC = "request-quota"
OTHER_REQUESTS = 150
DEADLINE_S = 20.0  # generous for a loaded machine; the throttle comes within a second or two


class NamedClient(RawClient):
    """A raw connection that names its client id (RawClient always says ``raw-test``)."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        super().__init__(bootstrap, timeout=30)
        self.client_id = client_id

    def request(self, request: Any, version: int) -> Any:
        self._correlation += 1
        request.with_header(correlation_id=self._correlation, client_id=self.client_id)
        self.sock.sendall(bytes(request.encode(version=version, header=True, framed=True)))
        return self.read_response(type(request), version)


def _metadata() -> tuple[Any, int]:
    return MetadataRequest(topics=None, allow_auto_topic_creation=False), 9


def _list_offsets() -> tuple[Any, int]:
    partition = L.ListOffsetsTopic.ListOffsetsPartition(
        partition_index=0, current_leader_epoch=-1, timestamp=-1
    )
    request = L(
        replica_id=-1,
        isolation_level=0,
        topics=[L.ListOffsetsTopic(name=TOPIC, partitions=[partition])],
        timeout_ms=1000,
    )
    return request, 7


def _produce() -> tuple[Any, int]:
    records = build_batch([(b"k", b"v" * 100, [], int(time.time() * 1000))])
    pd = P.TopicProduceData.PartitionProduceData(index=0, records=records)
    request = P(
        transactional_id=None,
        acks=1,
        timeout_ms=5000,
        topic_data=[P.TopicProduceData(name=TOPIC, partition_data=[pd])],
    )
    return request, 8


REQUESTS: tuple[Callable[[], tuple[Any, int]], ...] = (_metadata, _list_offsets, _produce)


def _busy_loop(client: NamedClient, stop: Callable[[list[int]], bool]) -> list[int]:
    """Metadata, ListOffsets and Produce back to back, each round followed by an
    ApiVersions (exempt), until ``stop(throttles)`` or the deadline; the throttle times of
    the quota-counted requests."""
    throttles: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for make in REQUESTS:
            request, version = make()
            throttles.append(client.request(request, version).throttle_time_ms)
            if stop(throttles):
                return throttles
        versions = client.request(
            ApiVersionsRequest(client_software_name="raw", client_software_version="1"), 3
        )
        assert versions.error_code == 0
    return throttles


def test_a_client_over_its_request_percentage_is_throttled_and_muted(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic(TOPIC, 1, 1)])[TOPIC].result(15)
        alter(b.bootstrap, [("client-id", "busy")], {"request_percentage": 1.0})

        with NamedClient(b.bootstrap, "busy") as busy:
            throttles = _busy_loop(busy, any)
            counted = len(throttles)
            assert any(throttles), f"no throttle within {DEADLINE_S}s of {counted} requests"
            # Muted: the next request is not even read until the throttle time has passed.
            sent = time.monotonic()
            response = busy.request(*_metadata())
            waited = time.monotonic() - sent
            counted += 1
        assert waited >= throttles[-1] / 1000 * 0.9, (waited, throttles[-1])
        print(
            f"\nbusy: throttled after {counted - 1} requests, throttle_time_ms "
            f"{throttles[-1]}, next Metadata answered after {waited * 1000:.0f} ms "
            f"(its throttle_time_ms {response.throttle_time_ms})"
        )

        with NamedClient(b.bootstrap, "other") as other:
            others = _busy_loop(other, lambda seen: len(seen) >= OTHER_REQUESTS)
        assert len(others) >= OTHER_REQUESTS
        assert not any(others), "a client id without a request quota was throttled"

        samples = b.scrape()
        count = total(samples, "streambus_throttle_time_seconds_count", type="request")
        seconds = total(samples, "streambus_throttle_time_seconds_sum", type="request")
        # One observation per quota-counted request of busy: its ApiVersions were exempt,
        # and other has no quota.
        assert count == counted, (count, counted)
        assert seconds > 0
        print(f"throttle histogram: {count:.0f} observations, {seconds:.2f} s in all")


def test_time_a_long_poll_waits_is_not_counted(tmp_path: Path) -> None:
    """A Fetch that waits out its max_wait_ms on an empty partition is suspended, not
    working: three 300 ms long polls within one second stay far under 20%."""
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        admin = AdminClient({"bootstrap.servers": b.bootstrap})
        admin.create_topics([NewTopic("idle", 1, 1)])["idle"].result(15)
        alter(b.bootstrap, [("client-id", "poller")], {"request_percentage": 20.0})
        with NamedClient(b.bootstrap, "poller") as poller:
            waits, throttles = [], []
            for _ in range(3):
                sent = time.monotonic()
                response = poller.request(fetch_request("idle", max_wait_ms=300, min_bytes=1), 12)
                waits.append(time.monotonic() - sent)
                throttles.append(response.throttle_time_ms)
        assert min(waits) >= 0.25, waits  # each really waited out its long poll
        assert throttles == [0, 0, 0]
        samples = b.scrape()
        assert total(samples, "streambus_throttle_time_seconds_count", type="request") == 3


# -- kafka-configs ---------------------------------------------------------------------------


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[Tools]:
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: Kafka's command-line tools need Java 17 or newer")
    try:
        libs = ensure_kafka_tools(log=False).libs
    except RuntimeError as exc:  # no mvn, Java too old, Maven failed: a broken set-up
        pytest.fail(f"cannot fetch Kafka's command-line tools: {exc}", pytrace=False)
    with BrokerThread(tmp_path / "data", metrics=False) as b:
        yield Tools(libs, b)


@pytest.mark.slow
def test_kafka_configs_sets_and_describes_request_percentage(tools: Tools) -> None:
    entity = ("--entity-type", "clients", "--entity-name", "busy")
    altered = tools.configs("--alter", *entity, "--add-config", "request_percentage=1")
    assert "Completed updating config for client busy." in altered.stdout, altered
    described = tools.configs("--describe", *entity)
    line = [x for x in described.lines if x.startswith("Quota configs for client-id 'busy'")]
    assert len(line) == 1, described
    assert "request_percentage=1.0" in line[0], described
