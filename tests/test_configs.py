"""Kafka's config APIs (DescribeConfigs, AlterConfigs, IncrementalAlterConfigs) driven by
confluent-kafka's and kafka-python's admin clients, and raw frames where a client cannot
say what a test needs (the cluster-wide default entity, documentation, legacy replace)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewTopic,
)
from kafka.admin import ConfigResource as KConfigResource
from kafka.admin import ConfigResourceType, KafkaAdminClient
from kafka.protocol.admin import (
    AlterConfigsRequest,
    DescribeConfigsRequest,
    IncrementalAlterConfigsRequest,
)

from streambus.cluster import AlterBrokerConfigs, AlterTopicConfigs, CreateTopic, RegisterBroker
from streambus.cluster.records import from_wire, to_wire
from streambus.cluster.state import ClusterState, apply, state_from_wire, state_to_wire
from streambus.config_docs import TOPIC_DOCS
from streambus.records.batch import compression_of, walk_batches
from streambus.structs import TopicPartition
from streambus.topic_config import APPLIED, KAFKA_NAMES, SPECS, TopicConfig
from tests.harness import BrokerProcess, BrokerThread, ClusterProcesses, RawClient, wait_until
from tests.test_cluster import CLUSTER_ENV, restart, wait_cluster_size

TOPIC, BROKER, BROKER_LOGGER = 2, 4, 8
INVALID_CONFIG, INVALID_REQUEST, UNKNOWN_TOPIC = 40, 42, 3

# Topic configs Kafka 4.4 defines that StreamBus had no use for before, with valid values.
KAFKA_ONLY = {
    "compression.type": "zstd",
    "file.delete.delay.ms": "1000",
    "segment.index.bytes": "4096",
    "segment.jitter.ms": "10",
    "preallocate": "true",
    "min.cleanable.dirty.ratio": "0.25",
    "max.compaction.lag.ms": "600000",
    "message.timestamp.after.max.ms": "5000",
    "message.timestamp.before.max.ms": "5000",
    "compression.gzip.level": "6",
    "follower.replication.throttled.replicas": "0:1",
    "local.retention.ms": "-2",
}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "b", metrics=False, topic={"retention.bytes": "1000000"}) as b:
        yield b


def _admin(b: Any) -> AdminClient:
    return AdminClient({"bootstrap.servers": b.bootstrap})


def _create(admin: AdminClient, name: str, config: dict[str, str]) -> None:
    for future in admin.create_topics([NewTopic(name, 1, 1, config=config)]).values():
        future.result(30)


def _describe(admin: AdminClient, kind: str, name: str) -> dict[str, Any]:
    (future,) = admin.describe_configs([ConfigResource(kind, name)], request_timeout=30).values()
    result: dict[str, Any] = future.result(30)
    return result


def _incremental(admin: AdminClient, kind: str, name: str, **ops: Any) -> None:
    entries = [
        ConfigEntry(key.replace("_", "."), value, incremental_operation=op)
        for key, (op, value) in ops.items()
    ]
    resource = ConfigResource(kind, name, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def _error(fn: Any) -> Any:
    with pytest.raises(KafkaException) as caught:
        fn()
    return caught.value.args[0]


def _raw_describe(b: Any, kind: int, name: str, version: int = 4) -> Any:
    D = DescribeConfigsRequest
    request = D(
        resources=[D.DescribeConfigsResource(resource_type=kind, resource_name=name)],
        include_synonyms=True,
        include_documentation=True,
    )
    request.resources[0].configuration_keys = None
    with RawClient(b.bootstrap) as client:
        (result,) = client.request(request, version).results
    return result


def _raw_incremental(
    b: Any, kind: int, name: str, configs: list[tuple[str, int, str | None]]
) -> Any:
    Inc = IncrementalAlterConfigsRequest
    request = Inc(
        resources=[
            Inc.AlterConfigsResource(
                resource_type=kind,
                resource_name=name,
                configs=[
                    Inc.AlterConfigsResource.AlterableConfig(name=n, config_operation=op, value=v)
                    for n, op, v in configs
                ],
            )
        ],
        validate_only=False,
    )
    with RawClient(b.bootstrap) as client:
        (response,) = client.request(request, 1).responses
    return response


def test_describe_topic_sources_synonyms_and_types(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "described", {"retention.ms": "60000"})
    configs = _describe(admin, "topic", "described")
    assert set(configs) == set(KAFKA_NAMES)  # every topic config Kafka 4.4 defines
    retention = configs["retention.ms"]
    assert (retention.value, retention.source) == ("60000", ConfigSource.DYNAMIC_TOPIC_CONFIG.value)
    assert retention.synonyms["log.retention.ms"].source == ConfigSource.DEFAULT_CONFIG.value
    size = configs["retention.bytes"]  # --topic-config / STREAMBUS_TOPIC_RETENTION_BYTES
    assert (size.value, size.source) == ("1000000", ConfigSource.STATIC_BROKER_CONFIG.value)
    segment = configs["segment.bytes"]
    assert (segment.value, segment.source) == ("1073741824", ConfigSource.DEFAULT_CONFIG.value)
    assert not segment.is_read_only
    assert not segment.is_sensitive
    # v4 with documentation and types, as the raw protocol carries them
    raw = {c.name: c for c in _raw_describe(broker, TOPIC, "described").configs}
    assert raw["retention.ms"].config_type == 5  # LONG
    assert raw["cleanup.policy"].config_type == 7  # LIST
    assert raw["min.cleanable.dirty.ratio"].config_type == 6  # DOUBLE
    assert raw["retention.ms"].documentation == TOPIC_DOCS["retention.ms"]
    assert raw["preallocate"].documentation.endswith(
        "StreamBus stores this setting but does not apply it."
    )
    # v0 has no sources, only is_default
    v0 = {c.name: c for c in _raw_describe(broker, TOPIC, "described", version=0).configs}
    assert v0["retention.ms"].is_default is False
    assert v0["segment.bytes"].is_default is True


def test_describe_unknown_topic_and_bad_resources(broker: BrokerThread) -> None:
    assert _raw_describe(broker, TOPIC, "no-such-topic").error_code == UNKNOWN_TOPIC
    assert _raw_describe(broker, BROKER, "not-an-id").error_code == INVALID_REQUEST
    assert _raw_describe(broker, BROKER, "7").error_code == INVALID_REQUEST  # not this broker
    assert _raw_describe(broker, 3, "x").error_code == INVALID_REQUEST  # GROUP: not served here


def test_describe_broker(broker: BrokerThread) -> None:
    configs = _describe(_admin(broker), "broker", "1")
    dirs = configs["log.dirs"]
    assert dirs.value == str(broker.data_dir)
    assert dirs.is_read_only
    assert dirs.source == ConfigSource.STATIC_BROKER_CONFIG.value
    secret = configs["cluster.secret"]
    assert secret.is_sensitive
    assert secret.value is None
    assert configs["node.id"].value == "1"
    assert configs["num.partitions"].source == ConfigSource.DEFAULT_CONFIG.value
    # topic defaults by their broker names: dynamic, so not read-only
    default = configs["log.retention.bytes"]
    assert (default.value, default.source) == ("1000000", ConfigSource.STATIC_BROKER_CONFIG.value)
    assert not default.is_read_only
    assert configs["log.roll.ms"].value == "604800000"
    raw = {c.name: c for c in _raw_describe(broker, BROKER, "1").configs}
    assert raw["log.dirs"].documentation
    assert raw["auto.create.topics.enable"].config_type == 1


def test_every_kafka_topic_config_is_accepted_and_stored(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "stored", {**KAFKA_ONLY, "message.timestamp.type": "LogAppendTime"})
    configs = _describe(admin, "topic", "stored")
    for key, value in KAFKA_ONLY.items():
        assert configs[key].value == value, key
        assert configs[key].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert configs["message.timestamp.type"].value == "LogAppendTime"
    meta = broker.run(lambda: broker.broker.logs.topics()["stored"])
    assert dict(meta.overrides)["compression.type"] == "zstd"  # kept in topic.json
    # and altered like any other
    _incremental(admin, "topic", "stored", compression_type=(AlterConfigOpType.SET, "lz4"))
    assert _describe(admin, "topic", "stored")["compression.type"].value == "lz4"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("retention.ms", "soon"),
        ("retention.ms", "-5"),
        ("min.insync.replicas", "0"),
        ("compression.type", "brotli"),
        ("min.cleanable.dirty.ratio", "1.5"),
        ("segment.index.bytes", "3"),
        ("preallocate", "maybe"),
        ("cleanup.policy", "forever"),
        ("compression.gzip.level", "12"),
        ("segment.bytes", "99999999999"),
        ("follower.replication.throttled.replicas", "one:two"),
        ("remote.storage.enable", "true"),
        ("no.such.config", "1"),
    ],
)
def test_bad_values_are_refused_with_invalid_config(
    broker: BrokerThread, key: str, value: str
) -> None:
    admin = _admin(broker)
    err = _error(lambda: _create(admin, f"bad-{abs(hash((key, value)))}", {key: value}))
    assert err.code() == INVALID_CONFIG
    assert key in err.str()
    _create(admin, "target", {})
    err = _error(
        lambda: _incremental(
            admin, "topic", "target", **{key.replace(".", "_"): (AlterConfigOpType.SET, value)}
        )
    )
    assert err.code() == INVALID_CONFIG
    assert key in err.str()
    assert "target" in admin.list_topics().topics
    assert key not in broker.run(lambda: dict(broker.broker.logs.topics()["target"].overrides))


def test_unknown_topic_and_read_only_broker_config(broker: BrokerThread) -> None:
    response = _raw_incremental(broker, TOPIC, "missing", [("retention.ms", 0, "1")])
    assert response.error_code == UNKNOWN_TOPIC
    response = _raw_incremental(broker, BROKER, "1", [("log.dirs", 0, "/elsewhere")])
    assert response.error_code == INVALID_REQUEST
    assert "dynamically" in response.error_message
    response = _raw_incremental(broker, BROKER, "1", [("log.roll.ms", 2, "5")])  # APPEND
    assert response.error_code == INVALID_REQUEST  # not a LIST config
    response = _raw_incremental(
        broker, TOPIC, "missing", [("retention.ms", 0, "1"), ("retention.ms", 1, None)]
    )
    assert response.error_code == INVALID_REQUEST  # a key twice


def test_alter_retention_deletes_segments_at_once(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "shrinking", {"segment.bytes": "2000", "retention.bytes": "-1"})
    failed: list[Any] = []
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "batch.size": 1000})
    for i in range(200):
        producer.produce(
            "shrinking",
            value=b"x" * 100,
            key=str(i).encode(),
            on_delivery=lambda err, _msg: failed.append(err) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not failed
    tp = TopicPartition("shrinking", 0)

    def segments() -> int:
        return int(broker.run(lambda: broker.broker.logs.log(tp).segment_count))

    assert segments() > 5
    _incremental(admin, "topic", "shrinking", retention_bytes=(AlterConfigOpType.SET, "2500"))
    assert broker.run(lambda: broker.broker.logs.log(tp).config.retention_bytes) == 2500
    wait_until(lambda: segments() <= 3, timeout=30)
    start = broker.run(lambda: broker.broker.logs.log(tp).log_start_offset)
    assert start > 0
    # kafka-python, the legacy AlterConfigs: retention.ms to 1 ms empties all but the active one
    client = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        client.alter_configs(
            [KConfigResource(ConfigResourceType.TOPIC, "shrinking", configs={"retention.ms": "1"})],
            incremental=False,
        )
        described = client.describe_configs(
            [KConfigResource(ConfigResourceType.TOPIC, "shrinking")]
        )
    finally:
        client.close()
    modified = described["topic"]["shrinking"]
    # the client sent the other modified configs along, as it must with the legacy API
    assert modified["retention.ms"]["value"] == "1"
    assert modified["segment.bytes"]["value"] == "2000"
    wait_until(lambda: segments() == 1, timeout=30)


def test_validate_only_changes_nothing(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "checked", {})
    resource = ConfigResource(
        "topic",
        "checked",
        incremental_configs=[
            ConfigEntry("retention.ms", "5", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource], validate_only=True).values():
        future.result(30)
    assert _describe(admin, "topic", "checked")["retention.ms"].source == (
        ConfigSource.DEFAULT_CONFIG.value
    )


def test_incremental_list_operations_and_delete(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "listed", {"min.insync.replicas": "1"})
    _incremental(admin, "topic", "listed", cleanup_policy=(AlterConfigOpType.APPEND, "compact"))
    config = broker.run(lambda: broker.broker.logs.topic_config("listed"))
    assert config.cleanup_policy.compacts
    assert config.cleanup_policy.deletes
    _incremental(admin, "topic", "listed", cleanup_policy=(AlterConfigOpType.SUBTRACT, "delete"))
    assert _describe(admin, "topic", "listed")["cleanup.policy"].value == "compact"
    _incremental(admin, "topic", "listed", min_insync_replicas=(AlterConfigOpType.DELETE, None))
    described = _describe(admin, "topic", "listed")["min.insync.replicas"]
    assert described.source == ConfigSource.DEFAULT_CONFIG.value


def test_legacy_alter_configs_replaces_the_whole_set(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "replaced", {"retention.ms": "60000", "segment.ms": "3600000"})
    A = AlterConfigsRequest
    request = A(
        resources=[
            A.AlterConfigsResource(
                resource_type=TOPIC,
                resource_name="replaced",
                configs=[A.AlterConfigsResource.AlterableConfig(name="flush.ms", value="1000")],
            )
        ],
        validate_only=False,
    )
    with RawClient(broker.bootstrap) as client:
        (response,) = client.request(request, 2).responses
    assert response.error_code == 0
    overrides = broker.run(lambda: dict(broker.broker.logs.topics()["replaced"].overrides))
    assert overrides == {"flush.ms": "1000"}


def test_cluster_default_broker_configs(broker: BrokerThread) -> None:
    admin = _admin(broker)
    _create(admin, "follows", {})
    _create(admin, "own", {"retention.ms": "60000"})
    response = _raw_incremental(
        broker,
        BROKER,
        "",
        [("log.retention.ms", 0, "120000"), ("log.cleaner.delete.retention.ms", 0, "5000")],
    )
    assert response.error_code == 0, response.error_message
    follows = _describe(admin, "topic", "follows")["retention.ms"]
    assert (follows.value, follows.source) == (
        "120000",
        ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value,
    )
    assert broker.run(lambda: broker.broker.logs.topic_config("follows").retention_ms) == 120000
    assert _describe(admin, "topic", "own")["retention.ms"].value == "60000"
    entries = {c.name: c for c in _raw_describe(broker, BROKER, "").configs}
    assert set(entries) == {"log.retention.ms", "log.cleaner.delete.retention.ms"}
    assert entries["log.retention.ms"].config_source == 3
    # this broker's own setting wins over the cluster default
    response = _raw_incremental(broker, BROKER, "1", [("log.retention.ms", 0, "180000")])
    assert response.error_code == 0
    own = _describe(admin, "broker", "1")["log.retention.ms"]
    assert (own.value, own.source) == ("180000", ConfigSource.DYNAMIC_BROKER_CONFIG.value)
    response = _raw_incremental(broker, BROKER, "", [("log.retention.ms", 0, "-7")])
    assert response.error_code == INVALID_CONFIG


def test_broker_loggers(broker: BrokerThread) -> None:
    response = _raw_incremental(broker, BROKER_LOGGER, "1", [("streambus.protocol", 0, "DEBUG")])
    assert response.error_code == 0, response.error_message
    try:
        levels = {c.name: c.value for c in _raw_describe(broker, BROKER_LOGGER, "1").configs}
        assert levels["streambus.protocol"] == "DEBUG"
        response = _raw_incremental(broker, BROKER_LOGGER, "1", [("streambus.protocol", 0, "LOUD")])
        assert response.error_code == INVALID_CONFIG
    finally:
        _raw_incremental(broker, BROKER_LOGGER, "1", [("streambus.protocol", 1, None)])


def test_configs_survive_a_kill(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with BrokerProcess(data) as first:
        admin = _admin(first)
        _create(admin, "kept", {"compression.type": "gzip"})
        _incremental(admin, "topic", "kept", retention_ms=(AlterConfigOpType.SET, "90000"))
        response = _raw_incremental(first, BROKER, "", [("log.segment.bytes", 0, "500000")])
        assert response.error_code == 0
        response = _raw_incremental(first, BROKER, "1", [("log.retention.bytes", 0, "4000000")])
        assert response.error_code == 0
        first.kill()  # every answer above came after its change was on disk
    with BrokerProcess(data) as second:
        admin = _admin(second)
        configs = _describe(admin, "topic", "kept")
        assert configs["retention.ms"].value == "90000"
        assert configs["compression.type"].value == "gzip"
        segment = configs["segment.bytes"]
        assert (segment.value, segment.source) == (
            "500000",
            ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value,
        )
        size = _describe(admin, "broker", "1")["log.retention.bytes"]
        assert (size.value, size.source) == ("4000000", ConfigSource.DYNAMIC_BROKER_CONFIG.value)


# -- the records, without a broker -------------------------------------------------------------


def _registered() -> ClusterState:
    state, _ = apply(ClusterState(), RegisterBroker(1, "h", 1, "i"))
    return state


def test_broker_config_records_apply_and_round_trip() -> None:
    state = _registered()
    record = AlterBrokerConfigs(
        "", (("log.retention.ms", "5"), ("unclean.leader.election.enable", "true"))
    )
    assert from_wire(to_wire(record)) == record
    state, result = apply(state, record)
    assert result.ok
    assert dict(state.broker_configs[""]) == {
        "log.retention.ms": "5",
        "unclean.leader.election.enable": "true",
    }
    assert state_from_wire(state_to_wire(state)).broker_configs == state.broker_configs
    for bad, code in [
        (AlterBrokerConfigs("", (("log.dirs", "/x"),)), INVALID_REQUEST),
        (AlterBrokerConfigs("x", (("log.retention.ms", "5"),)), INVALID_REQUEST),
        (AlterBrokerConfigs("1", (("log.retention.ms", "five"),)), INVALID_CONFIG),
    ]:
        same, result = apply(state, bad)
        assert same is state
        assert result.error_code == code
    state, _ = apply(state, AlterBrokerConfigs("", (), replace=True))
    assert "" not in state.broker_configs


def test_topic_config_replace_record() -> None:
    state, _ = apply(
        _registered(), CreateTopic("t", uuid.uuid4(), ((1,),), (("retention.ms", "5"),))
    )
    state, result = apply(state, AlterTopicConfigs("t", (("segment.ms", "9"),), replace=True))
    assert result.ok
    assert dict(state.topics["t"].configs) == {"segment.ms": "9"}


def test_every_kafka_topic_config_has_a_spec_default_and_doc() -> None:
    assert set(SPECS) == set(KAFKA_NAMES) == set(TOPIC_DOCS)
    assert set(SPECS) >= APPLIED
    assert TopicConfig().to_kafka()["message.timestamp.after.max.ms"] == "3600000"


def test_configs_reach_every_broker_of_a_cluster(tmp_path: Path) -> None:
    with ClusterProcesses(tmp_path, 3, env=CLUSTER_ENV) as cluster:
        wait_cluster_size(cluster, 3)
        one, two, three = (cluster.brokers[n] for n in (1, 2, 3))
        admin = AdminClient({"bootstrap.servers": one.bootstrap})
        for future in admin.create_topics([NewTopic("everywhere", 1, 3)]).values():
            future.result(60)
        _incremental(
            _admin(two), "topic", "everywhere", retention_ms=(AlterConfigOpType.SET, "70000")
        )
        response = _raw_incremental(three, BROKER, "", [("log.retention.bytes", 0, "3000000")])
        assert response.error_code == 0, response.error_message

        def stored(node: int) -> dict[str, str]:
            path = cluster.brokers[node].data_dir / "topics" / "everywhere" / "topic.json"
            return dict(json.loads(path.read_text())["overrides"])

        def described(broker: BrokerProcess, kind: int, name: str) -> dict[str, Any]:
            return {c.name: c for c in _raw_describe(broker, kind, name).configs}

        # Every broker applies each record as its Raft replica commits it: soon, not at once.
        for node, broker in cluster.brokers.items():
            wait_until(lambda node=node: stored(node) == {"retention.ms": "70000"}, timeout=30)
            wait_until(
                lambda broker=broker: (
                    described(broker, TOPIC, "everywhere")["retention.bytes"].config_source == 3
                ),
                timeout=30,
            )
            configs = described(broker, TOPIC, "everywhere")
            assert configs["retention.ms"].value == "70000"
            assert configs["retention.bytes"].value == "3000000"
            assert described(broker, BROKER, str(node))["log.retention.bytes"].value == "3000000"
        # a restarted broker finds them in the quorum's journal (replayed as it starts)
        two.kill()
        # Fenced first: a broker restarted inside its old session's timeout may find its
        # node id still live and give up (the controller's own restart is the tested case).
        wait_cluster_size(cluster, 2)
        restart(cluster, 2)

        def caught_up() -> bool:
            configs = described(two, TOPIC, "everywhere")
            return (configs["retention.ms"].value, configs["retention.bytes"].value) == (
                "70000",
                "3000000",
            )

        wait_until(caught_up, timeout=30)


@pytest.mark.parametrize(
    ("topic_codec", "producer_codec"),
    [
        ("zstd", "gzip"),
        ("lz4", "none"),
        ("snappy", "zstd"),
        ("gzip", "lz4"),
        ("uncompressed", "zstd"),
    ],
)
def test_topic_compression_type_recompresses_batches(
    broker: BrokerThread, topic_codec: str, producer_codec: str
) -> None:
    codes = {"uncompressed": 0, "none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
    admin = _admin(broker)
    _create(admin, "squeezed", {"compression.type": topic_codec})
    sent = [(f"k{i}".encode(), (f"value {i} " * (i % 7 + 1)).encode()) for i in range(300)]
    producer = Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "compression.type": producer_codec,
            "linger.ms": 20,
        }
    )
    for key, value in sent:
        producer.produce("squeezed", value=value, key=key)
    assert producer.flush(30) == 0
    tp = TopicPartition("squeezed", 0)
    stored = bytes(broker.run(lambda: broker.broker.partitions.read(tp, 0, 50_000_000)))
    codecs = {compression_of(stored, pos) for pos, _ in walk_batches(stored)}
    assert codecs == {codes[topic_codec]}
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "squeezed-reader",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe(["squeezed"])
        got: list[tuple[bytes, bytes]] = []

        def read_all() -> bool:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                got.append((message.key(), message.value()))
            return len(got) >= len(sent)

        wait_until(read_all, timeout=60, interval=0)
    finally:
        consumer.close()
    assert got == sent
