"""Controller mutation quotas (KIP-599) through real sockets: CreateTopics, CreatePartitions
and DeleteTopics count partitions against ``controller_mutation_rate``; the versions that
know THROTTLING_QUOTA_EXCEEDED (89) get it for the topics met over the quota, older ones
are served and throttled; confluent-kafka's admin client and Kafka's own kafka-topics see
the same, and the throttle is observed in ``streambus_throttle_time_seconds``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic
from kafka.protocol.admin import CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest

from tests.harness import BrokerThread, RawClient, scrape, total
from tests.test_kafka_tools import TOPICS, Tools, kafka_tools
from tests.test_quotas import alter

__all__ = ["kafka_tools"]  # the session fixture, shared with the Kafka tools' module

THROTTLED = 89  # THROTTLING_QUOTA_EXCEEDED
RATE = 2.0  # partitions per second
# Burst = rate x num x size = 4 partitions; the longest throttle is num x size = 2 s.
WINDOW = {"quota_window_num": 2, "quota_window_size_seconds": 1.0}


@pytest.fixture
def b(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        yield b


def send(client: RawClient, client_id: str, request: Any, version: int) -> Any:
    """RawClient.request under a client id of the test's choosing."""
    client._correlation += 1
    request.with_header(correlation_id=client._correlation, client_id=client_id)
    client.sock.sendall(bytes(request.encode(version=version, header=True, framed=True)))
    return client.read_response(type(request), version)


def create(topics: dict[str, int]) -> Any:
    return CreateTopicsRequest(
        topics=[
            CreateTopicsRequest.CreatableTopic(
                name=name, num_partitions=n, replication_factor=1, assignments=[], configs=[]
            )
            for name, n in topics.items()
        ],
        timeout_ms=10_000,
        validate_only=False,
    )


def limit(b: BrokerThread, client_id: str) -> None:
    ok = alter(b.bootstrap, [("client-id", client_id)], {"controller_mutation_rate": RATE})
    assert [e.error_code for e in ok.entries] == [0]


def topic_names(b: BrokerThread) -> set[str]:
    return set(AdminClient({"bootstrap.servers": b.bootstrap}).list_topics(timeout=10).topics)


def throttles(b: BrokerThread) -> float:
    samples = scrape(b.metrics_url)
    return total(samples, "streambus_throttle_time_seconds_count", type="controller_mutation")


def test_create_topics_over_the_quota_get_throttling_quota_exceeded(b: BrokerThread) -> None:
    limit(b, "strict")
    with RawClient(b.bootstrap) as client:
        # The burst (4) is there: the first topic takes it 26 past zero (13 s to pay back at
        # 2/s, so a slow machine does not see it repaid), the rest are refused.
        r = send(client, "strict", create({"big": 30, "next": 1, "last": 1}), 7)
    codes = {t.name: t.error_code for t in r.topics}
    assert codes == {"big": 0, "next": THROTTLED, "last": THROTTLED}, r
    refused = next(t for t in r.topics if t.name == "next")
    assert "controller_mutation_rate" in refused.error_message
    assert r.throttle_time_ms == 2000  # 26 / 2 s, at most the whole window (2 x 1 s)
    names = topic_names(b)
    assert "big" in names
    assert not names & {"next", "last"}
    assert throttles(b) == 1

    # Another client id has no quota: served in full, and not observed.
    with RawClient(b.bootstrap) as client:
        free = send(client, "free", create({"free-a": 30, "free-b": 30}), 7)
    assert [t.error_code for t in free.topics] == [0, 0]
    assert free.throttle_time_ms == 0
    assert throttles(b) == 1


def test_old_versions_are_served_and_throttled(b: BrokerThread) -> None:
    limit(b, "old")
    with RawClient(b.bootstrap) as client:
        r = send(client, "old", create({"o1": 5, "o2": 5}), 5)  # v5 cannot be told 89
    assert [t.error_code for t in r.topics] == [0, 0]
    assert r.throttle_time_ms > 0  # 6 partitions in debt at 2/s
    assert {"o1", "o2"} <= topic_names(b)


def test_create_partitions_and_delete_topics_count_partitions(b: BrokerThread) -> None:
    with RawClient(b.bootstrap) as client:
        made = send(client, "setup", create({"grow": 1, "gone": 3, "kept": 3}), 7)
        assert [t.error_code for t in made.topics] == [0, 0, 0]
        limit(b, "alter")
        grown = send(
            client,
            "alter",
            CreatePartitionsRequest(
                topics=[
                    CreatePartitionsRequest.CreatePartitionsTopic(
                        name="grow", count=29, assignments=None
                    ),
                ],
                timeout_ms=10_000,
                validate_only=False,
            ),
            3,
        )
        assert [t.error_code for t in grown.results] == [0]  # 28 new: 24 in debt
        deleted = send(
            client,
            "alter",
            DeleteTopicsRequest(
                topics=[
                    DeleteTopicsRequest.DeleteTopicState(name=n, topic_id=None)
                    for n in ("gone", "kept")
                ]
            ),
            6,
        )
    assert {t.name: t.error_code for t in deleted.responses} == {
        "gone": THROTTLED,
        "kept": THROTTLED,
    }
    assert deleted.throttle_time_ms > 0
    assert {"gone", "kept"} <= topic_names(b)
    meta = AdminClient({"bootstrap.servers": b.bootstrap}).list_topics("grow", timeout=10)
    assert len(meta.topics["grow"].partitions) == 29


def test_confluent_admin_client_is_throttled(b: BrokerThread) -> None:
    """librdkafka's CreateTopics/CreatePartitions are below the strict versions: its requests
    are served and throttled, never refused."""
    limit(b, "rdkafka")
    admin = AdminClient({"bootstrap.servers": b.bootstrap, "client.id": "rdkafka"})
    futures = admin.create_topics([NewTopic("ck-a", 6), NewTopic("ck-b", 6)])
    for future in futures.values():
        future.result(30)
    grown = admin.create_partitions([NewPartitions("ck-a", 8)])
    grown["ck-a"].result(30)
    assert len(admin.list_topics("ck-a", timeout=10).topics["ck-a"].partitions) == 8
    samples = scrape(b.metrics_url)
    assert total(samples, "streambus_throttle_time_seconds_count", type="controller_mutation") >= 2
    assert total(samples, "streambus_throttle_time_seconds_sum", type="controller_mutation") > 0


def test_kafka_topics_over_the_quota(kafka_tools: Path, b: BrokerThread) -> None:
    tools = Tools(kafka_tools, b)
    tools.configs(
        "--alter",
        "--entity-type",
        "users",
        "--entity-default",
        "--add-config",
        "controller_mutation_rate=2",
    )
    described = tools.configs("--describe", "--entity-type", "users", "--entity-default")
    assert "controller_mutation_rate=2.0" in described.stdout, described
    tools.topics("--create", "--topic", "kt-big", "--partitions", "20")
    refused = tools.run(TOPICS, "--bootstrap-server", b.bootstrap, "--create", "--topic", "kt-next")
    assert refused.returncode != 0, refused
    assert "ThrottlingQuotaExceededException" in refused.stdout + refused.stderr, refused
    assert "kt-next" not in topic_names(b)
