"""Apache Kafka's own command-line tools against a StreamBus broker.

Each test runs the tools' classes from ``org.apache.kafka:kafka-tools`` (the version
``bench/kafka-tools/pom.xml`` pins, fetched with Maven into ``.tools/`` once) with
``java -cp``, as ``bin/kafka-topics.sh`` and its siblings do, and asserts what the tool
printed: an operator reads the output, and several tools exit 0 after printing an error.

One broker serves the whole module (each test its own topics and groups). A JVM per
command costs a second or two, so each test groups the commands of one workflow.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.kafka import ensure_kafka_tools
from streambus.records.batch import walk_batches
from tests.harness import BrokerThread, wait_until

pytestmark = pytest.mark.slow

# The classes behind Kafka's bin/ scripts.
TOPICS = "org.apache.kafka.tools.TopicCommand"  # kafka-topics.sh
CONFIGS = "org.apache.kafka.tools.ConfigCommand"  # kafka-configs.sh
GROUPS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"  # kafka-consumer-groups.sh
DELETE_RECORDS = "org.apache.kafka.tools.DeleteRecordsCommand"  # kafka-delete-records.sh
LOG_DIRS = "org.apache.kafka.tools.LogDirsCommand"  # kafka-log-dirs.sh
GET_OFFSETS = "org.apache.kafka.tools.GetOffsetShell"  # kafka-get-offsets.sh
CONSOLE_PRODUCER = "org.apache.kafka.tools.ConsoleProducer"  # kafka-console-producer.sh
CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"  # kafka-console-consumer.sh

# A short-lived client JVM: the C1 compiler only and the serial collector start fastest.
JVM_OPTS = (
    "-Xmx256m",
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-Xshare:auto",
    "-Djava.awt.headless=true",
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
)
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


@dataclass(frozen=True)
class ToolRun:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"{' '.join(self.args)} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def kafka_tools() -> Path:
    """The tools' jars; skipped only when there is no Java to run them."""
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: Kafka's command-line tools need Java 17 or newer")
    try:
        return ensure_kafka_tools(log=False).libs
    except RuntimeError as exc:  # no mvn, Java too old, Maven failed: a broken set-up
        pytest.fail(f"cannot fetch Kafka's command-line tools: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path_factory.mktemp("kafka-tools") / "data",
        metrics=False,
        num_partitions=2,
        group_initial_rebalance_delay_ms=0,
    ) as b:
        yield b


class Tools:
    """Runs one tool class per call against the broker."""

    def __init__(self, libs: Path, broker: BrokerThread) -> None:
        self.libs = libs
        self.broker = broker
        self.bootstrap = broker.bootstrap

    def run(self, main_class: str, *args: str, stdin: str = "", timeout: float = 90) -> ToolRun:
        cmd = ["java", *JVM_OPTS, "-cp", str(self.libs / "*"), main_class, *args]
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        short = (main_class.rsplit(".", 1)[1], *args)
        return ToolRun(short, done.returncode, done.stdout, done.stderr)

    def ok(self, main_class: str, *args: str, stdin: str = "", timeout: float = 90) -> ToolRun:
        """Run a command that must succeed: exit 0 and no error printed."""
        run = self.run(main_class, *args, stdin=stdin, timeout=timeout)
        assert run.returncode == 0, run
        for stream in (run.stdout, run.stderr):
            assert not re.search(r"\bError\b|Exception|does not support", stream), run
        return run

    def topics(self, *args: str) -> ToolRun:
        return self.ok(TOPICS, "--bootstrap-server", self.bootstrap, *args)

    def configs(self, *args: str) -> ToolRun:
        return self.ok(CONFIGS, "--bootstrap-server", self.bootstrap, *args)

    def groups(self, *args: str) -> ToolRun:
        return self.ok(GROUPS, "--bootstrap-server", self.bootstrap, *args)

    def offsets(self, topic: str, time: str) -> dict[int, int]:
        """kafka-get-offsets: {partition: offset}, from its ``topic:partition:offset`` lines."""
        return self.offsets_at(topic, [time])[time]

    def offsets_at(self, topic: str, times: list[str]) -> dict[str, dict[int, int]]:
        """kafka-get-offsets for each ``--time``, the JVMs side by side (they only read)."""
        args = ("--bootstrap-server", self.bootstrap, "--topic", topic, "--time")
        with ThreadPoolExecutor(len(times)) as pool:
            runs = pool.map(lambda t: self.ok(GET_OFFSETS, *args, t), times)
            return {t: self._offset_lines(topic, run) for t, run in zip(times, runs, strict=True)}

    @staticmethod
    def _offset_lines(topic: str, run: ToolRun) -> dict[int, int]:
        out: dict[int, int] = {}
        for line in run.lines:
            match = re.fullmatch(rf"{re.escape(topic)}:(\d+):(-?\d+)", line.strip())
            assert match, f"unexpected line {line!r}\n{run}"
            out[int(match.group(1))] = int(match.group(2))
        return out

    def produce(self, topic: str, values: list[str], *extra: str) -> ToolRun:
        return self.ok(
            CONSOLE_PRODUCER,
            "--bootstrap-server",
            self.bootstrap,
            "--topic",
            topic,
            *extra,
            stdin="".join(f"{v}\n" for v in values),
        )

    def consume(self, *args: str, count: int) -> ToolRun:
        """kafka-console-consumer until ``count`` messages; its summary line is checked."""
        run = self.ok(
            CONSOLE_CONSUMER,
            "--bootstrap-server",
            self.bootstrap,
            "--from-beginning",
            "--max-messages",
            str(count),
            "--timeout-ms",
            "30000",
            *args,
        )
        assert f"Processed a total of {count} messages" in run.stderr, run
        return run

    def describe_group(self, group: str) -> dict[tuple[str, int], tuple[int, int, int]]:
        """kafka-consumer-groups --describe: {(topic, partition): (current, log end, lag)}."""
        run = self.groups("--describe", "--group", group)
        rows: dict[tuple[str, int], tuple[int, int, int]] = {}
        for line in run.lines:
            cells = line.split()
            if cells[0] == group and len(cells) >= 6:
                rows[(cells[1], int(cells[2]))] = (int(cells[3]), int(cells[4]), int(cells[5]))
        return rows


@pytest.fixture
def tools(kafka_tools: Path, broker: BrokerThread) -> Tools:
    return Tools(kafka_tools, broker)


def stored_codecs(broker: BrokerThread, topic: str) -> set[int]:
    """The compression codec of every batch stored for ``topic``, read from its segments."""
    codecs: set[int] = set()
    for log in (broker.data_dir / "topics" / topic).glob("*/*.log"):
        codecs.update(header.compression for _, header in walk_batches(log.read_bytes()))
    return codecs


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Set-up done with confluent-kafka's admin client: a JVM less where topics are not the
    subject."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions)])[topic].result(30)


def produce_keyed(bootstrap: str, topic: str, records: list[tuple[int, int]]) -> None:
    """(partition, timestamp ms) records with confluent-kafka, values ``v<i>``."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i, (partition, timestamp) in enumerate(records):
        producer.produce(topic, f"v{i}".encode(), partition=partition, timestamp=timestamp)
        producer.flush(10)  # one batch per record: each keeps its own timestamp
    assert producer.flush(10) == 0


# -- kafka-topics ------------------------------------------------------------------------------


def test_topics_create_list_alter_partitions_delete(tools: Tools) -> None:
    created = tools.topics(
        "--create", "--topic", "kt-topics", "--partitions", "2", "--replication-factor", "1"
    )
    assert created.lines == ["Created topic kt-topics."], created

    again = tools.run(
        TOPICS, "--bootstrap-server", tools.bootstrap, "--create", "--topic", "kt-topics"
    )
    assert again.returncode == 1, again
    # Kafka says "Topic 'kt-topics' already exists."
    assert re.search(
        r"TopicExistsException: topic 'kt-topics' already exists", again.stderr, re.I
    ), again

    assert "kt-topics" in tools.topics("--list").lines

    # --alter prints nothing on success; the new partition shows in every partition listing.
    tools.topics("--alter", "--topic", "kt-topics", "--partitions", "3")
    assert tools.offsets("kt-topics", "-1") == {0: 0, 1: 0, 2: 0}
    shrink = tools.run(
        TOPICS, "--bootstrap-server", tools.bootstrap, "--alter", "--topic", "kt-topics",
        "--partitions", "2",
    )  # fmt: skip
    assert shrink.returncode == 1, shrink
    assert "InvalidPartitionsException" in shrink.stderr, shrink

    tools.topics("--delete", "--topic", "kt-topics")
    assert "kt-topics" not in tools.topics("--list").lines


def test_topics_describe(tools: Tools) -> None:
    tools.topics(
        "--create", "--topic", "kt-describe", "--partitions", "3", "--replication-factor", "1",
        "--config", "retention.ms=3600000", "--config", "cleanup.policy=compact",
    )  # fmt: skip
    run = tools.topics("--describe", "--topic", "kt-describe")
    head = [line for line in run.lines if line.startswith("Topic: kt-describe\tTopicId:")]
    assert len(head) == 1, run
    assert re.search(r"PartitionCount: 3\s+ReplicationFactor: 1\s+Configs: ", head[0]), run
    assert "retention.ms=3600000" in head[0], run
    assert "cleanup.policy=compact" in head[0], run
    partitions = re.findall(
        r"Topic: kt-describe\s+Partition: (\d+)\s+Leader: 1\s+Replicas: 1\s+Isr: 1", run.stdout
    )
    assert sorted(partitions) == ["0", "1", "2"], run


# -- kafka-configs -----------------------------------------------------------------------------


def test_configs_topics_describe_alter(tools: Tools) -> None:
    tools.topics("--create", "--topic", "kt-configs", "--config", "retention.ms=3600000")
    entity = ("--entity-type", "topics", "--entity-name", "kt-configs")
    described = tools.configs("--describe", *entity)
    assert described.lines[0] == "Dynamic configs for topic kt-configs are:", described
    assert re.search(
        r"^\s+retention\.ms=3600000 sensitive=false "
        r"synonyms=\{DYNAMIC_TOPIC_CONFIG:retention\.ms=3600000",
        described.stdout,
        re.M,
    ), described

    altered = tools.configs(
        "--alter", *entity, "--add-config", "retention.ms=7200000,max.message.bytes=65536"
    )
    assert "Completed updating config for topic kt-configs." in altered.stdout, altered
    after = tools.configs("--describe", *entity).stdout
    assert re.search(r"^\s+retention\.ms=7200000 ", after, re.M), after
    assert re.search(r"^\s+max\.message\.bytes=65536 ", after, re.M), after

    tools.configs("--alter", *entity, "--delete-config", "max.message.bytes")
    after = tools.configs("--describe", *entity).stdout
    assert "max.message.bytes" not in after, after
    assert "retention.ms=7200000" in after, after

    # --all adds the defaults: a config left unset is described with the broker's value.
    every = tools.configs("--describe", "--all", *entity)
    assert every.lines[0] == "All configs for topic kt-configs are:", every
    assert re.search(r"^\s+segment\.bytes=1073741824 ", every.stdout, re.M), every
    assert re.search(r"^\s+retention\.ms=7200000 ", every.stdout, re.M), every


def test_configs_brokers_describe_alter(tools: Tools) -> None:
    every = tools.configs("--describe", "--all", "--entity-type", "brokers", "--entity-name", "1")
    assert every.lines[0] == "All configs for broker 1 are:", every
    # Started with num_partitions=2 and group_initial_rebalance_delay_ms=0.
    assert re.search(r"^\s+num\.partitions=2 sensitive=false", every.stdout, re.M), every
    assert re.search(r"^\s+group\.initial\.rebalance\.delay\.ms=0 ", every.stdout, re.M), every

    altered = tools.configs(
        "--alter", "--entity-type", "brokers", "--entity-default",
        "--add-config", "log.retention.ms=3600000",
    )  # fmt: skip
    assert "Completed updating default config for brokers in the cluster." in altered.stdout
    default = tools.configs("--describe", "--entity-type", "brokers", "--entity-default")
    assert default.lines[0] == "Default configs for brokers in the cluster are:", default
    assert re.search(
        r"^\s+log\.retention\.ms=3600000 sensitive=false "
        r"synonyms=\{DYNAMIC_DEFAULT_BROKER_CONFIG:log\.retention\.ms=3600000",
        default.stdout,
        re.M,
    ), default

    tools.configs(
        "--alter", "--entity-type", "brokers", "--entity-default",
        "--delete-config", "log.retention.ms",
    )  # fmt: skip
    default = tools.configs("--describe", "--entity-type", "brokers", "--entity-default")
    assert "log.retention.ms" not in default.stdout, default


def test_configs_clients_quotas(tools: Tools) -> None:
    entity = ("--entity-type", "clients", "--entity-name", "kt-client")
    altered = tools.configs(
        "--alter", *entity, "--add-config", "producer_byte_rate=1048576,consumer_byte_rate=2097152"
    )
    assert "Completed updating config for client kt-client." in altered.stdout, altered
    described = tools.configs("--describe", *entity)
    line = [x for x in described.lines if x.startswith("Quota configs for client-id 'kt-client'")]
    assert len(line) == 1, described
    assert "producer_byte_rate=1048576" in line[0], described
    assert "consumer_byte_rate=2097152" in line[0], described

    tools.configs("--alter", *entity, "--delete-config", "producer_byte_rate")
    described = tools.configs("--describe", *entity)
    assert "producer_byte_rate" not in described.stdout, described
    assert "consumer_byte_rate=2097152" in described.stdout, described
    everyone = tools.configs("--describe", "--entity-type", "clients")
    assert "client-id 'kt-client'" in everyone.stdout, everyone


# -- kafka-consumer-groups ---------------------------------------------------------------------


def test_configs_users_scram_credentials(tools: Tools) -> None:
    entity = ("--entity-type", "users", "--entity-name", "kt-alice")
    altered = tools.configs(
        "--alter", *entity,
        "--add-config", "SCRAM-SHA-256=[iterations=8192,password=kt-secret],"
        "SCRAM-SHA-512=[password=kt-secret]",
    )  # fmt: skip
    assert "Completed updating config for user kt-alice." in altered.stdout, altered
    described = tools.configs("--describe", *entity)
    line = [x for x in described.lines if x.startswith("SCRAM credential configs for user")]
    assert line == [
        "SCRAM credential configs for user-principal 'kt-alice' are "
        "SCRAM-SHA-256=iterations=8192, SCRAM-SHA-512=iterations=4096"
    ], described
    assert "kt-secret" not in described.stdout

    tools.configs("--alter", *entity, "--delete-config", "SCRAM-SHA-512")
    described = tools.configs("--describe", *entity)
    assert "SCRAM-SHA-512" not in described.stdout, described
    assert "SCRAM-SHA-256=iterations=8192" in described.stdout, described


def test_consumer_groups_list_describe_reset(tools: Tools) -> None:
    create_topic(tools.bootstrap, "kt-groups", 2)
    produce_keyed(tools.bootstrap, "kt-groups", [(0, 1000), (0, 1001), (0, 1002), (1, 1003)])
    read = tools.consume("--topic", "kt-groups", "--group", "kt-g", count=4)
    assert sorted(read.lines) == ["v0", "v1", "v2", "v3"], read

    assert "kt-g" in tools.groups("--list").lines
    assert tools.describe_group("kt-g") == {
        ("kt-groups", 0): (3, 3, 0),
        ("kt-groups", 1): (1, 1, 0),
    }

    reset = tools.groups(
        "--reset-offsets", "--group", "kt-g", "--topic", "kt-groups", "--to-earliest", "--execute"
    )
    rows = {tuple(line.split()) for line in reset.lines[1:]}
    assert rows == {("kt-g", "kt-groups", "0", "0"), ("kt-g", "kt-groups", "1", "0")}, reset
    assert tools.describe_group("kt-g") == {
        ("kt-groups", 0): (0, 3, 3),
        ("kt-groups", 1): (0, 1, 1),
    }

    # --to-offset on one partition: the dry run prints the plan, --execute applies it.
    plan = tools.groups(
        "--reset-offsets", "--group", "kt-g", "--topic", "kt-groups:0", "--to-offset", "2",
        "--dry-run",
    )  # fmt: skip
    assert ("kt-g", "kt-groups", "0", "2") in {tuple(x.split()) for x in plan.lines}, plan
    tools.groups(
        "--reset-offsets", "--group", "kt-g", "--topic", "kt-groups:0", "--to-offset", "2",
        "--execute",
    )  # fmt: skip
    assert tools.describe_group("kt-g")[("kt-groups", 0)] == (2, 3, 1)
    again = tools.consume("--topic", "kt-groups", "--group", "kt-g", count=2)
    assert sorted(again.lines) == ["v2", "v3"], again


def test_consumer_groups_delete_offsets(tools: Tools) -> None:
    create_topic(tools.bootstrap, "kt-deloff", 2)
    produce_keyed(tools.bootstrap, "kt-deloff", [(0, 1000), (1, 1001)])
    tools.consume("--topic", "kt-deloff", "--group", "kt-deloff-g", count=2)
    assert set(tools.describe_group("kt-deloff-g")) == {("kt-deloff", 0), ("kt-deloff", 1)}

    run = tools.groups("--delete-offsets", "--group", "kt-deloff-g", "--topic", "kt-deloff:1")
    assert "Request succeeded for deleting offsets from group kt-deloff-g." in run.stdout, run
    assert re.search(r"^kt-deloff\s+1\s+Successful\s*$", run.stdout, re.M), run
    assert set(tools.describe_group("kt-deloff-g")) == {("kt-deloff", 0)}


# -- kafka-delete-records, kafka-log-dirs ------------------------------------------------------


def test_delete_records(tools: Tools, tmp_path: Path) -> None:
    create_topic(tools.bootstrap, "kt-delrec", 2)
    produce_keyed(tools.bootstrap, "kt-delrec", [(0, 1000 + i) for i in range(5)] + [(1, 2000)])
    spec = tmp_path / "offsets.json"
    spec.write_text(
        json.dumps(
            {"version": 1, "partitions": [{"topic": "kt-delrec", "partition": 0, "offset": 3}]}
        )
    )
    run = tools.ok(
        DELETE_RECORDS, "--bootstrap-server", tools.bootstrap, "--offset-json-file", str(spec)
    )
    assert re.search(r"partition: kt-delrec-0\s+low_watermark: 3", run.stdout), run
    assert tools.offsets("kt-delrec", "-2") == {0: 3, 1: 0}
    assert tools.offsets("kt-delrec", "-1") == {0: 5, 1: 1}
    read = tools.consume("--topic", "kt-delrec", "--partition", "0", count=2)
    assert read.lines == ["v3", "v4"], read


def test_log_dirs(tools: Tools, broker: BrokerThread) -> None:
    create_topic(tools.bootstrap, "kt-logdirs", 2)
    produce_keyed(tools.bootstrap, "kt-logdirs", [(0, 1000), (0, 1001)])
    run = tools.ok(
        LOG_DIRS, "--bootstrap-server", tools.bootstrap, "--describe", "--topic-list", "kt-logdirs"
    )
    assert "Received log directory information from brokers 1" in run.stdout, run
    report = json.loads(next(x for x in run.lines if x.startswith("{")))
    assert [b["broker"] for b in report["brokers"]] == [1], run
    (log_dir,) = report["brokers"][0]["logDirs"]
    assert log_dir["error"] is None, run
    assert Path(log_dir["logDir"]).resolve().is_relative_to(broker.data_dir.resolve()), run
    sizes = {p["partition"]: p["size"] for p in log_dir["partitions"]}
    assert set(sizes) == {"kt-logdirs-0", "kt-logdirs-1"}, run
    on_disk = sum(
        f.stat().st_size for f in (broker.data_dir / "topics" / "kt-logdirs" / "0").glob("*.log")
    )
    assert sizes["kt-logdirs-0"] == on_disk > 0, run
    assert sizes["kt-logdirs-1"] == 0, run


# -- kafka-get-offsets -------------------------------------------------------------------------

# Partition 0's records with their timestamps, out of order: the largest is at offset 2.
STAMPED = [(0, 1000), (0, 2000), (0, 9000), (0, 3000), (1, 5000)]


def test_get_offsets_latest_earliest_timestamp(tools: Tools) -> None:
    create_topic(tools.bootstrap, "kt-offsets", 2)
    produce_keyed(tools.bootstrap, "kt-offsets", STAMPED)
    # A timestamp: the first offset whose timestamp is at least it. Partition 1 has none as
    # late as 9000, and the tool leaves out a partition without an answer.
    assert tools.offsets_at("kt-offsets", ["-1", "-2", "latest", "2000", "2500", "9000"]) == {
        "-1": {0: 4, 1: 1},  # latest
        "-2": {0: 0, 1: 0},  # earliest
        "latest": {0: 4, 1: 1},
        "2000": {0: 1, 1: 0},
        "2500": {0: 2, 1: 0},
        "9000": {0: 2},
    }


def test_get_offsets_max_timestamp_local_and_tiered(tools: Tools) -> None:
    create_topic(tools.bootstrap, "kt-offsets-new", 2)
    produce_keyed(tools.bootstrap, "kt-offsets-new", STAMPED)
    found = tools.offsets_at("kt-offsets-new", ["-3", "max-timestamp", "-4", "-5"])
    assert found["-3"] == {0: 2, 1: 0}, found  # the largest timestamp
    assert found["max-timestamp"] == {0: 2, 1: 0}, found
    assert found["-4"] == {0: 0, 1: 0}, found  # earliest local: all of the log is local
    # Latest tiered: nothing is tiered, so no offset (-1) or none listed for the partition.
    assert set(found["-5"]) <= {0, 1}, found
    assert all(v == -1 for v in found["-5"].values()), found


# -- kafka-console-producer and kafka-console-consumer -----------------------------------------


def test_console_producer_each_codec_read_back(tools: Tools, broker: BrokerThread) -> None:
    for codec in CODECS:
        create_topic(tools.bootstrap, f"kt-codec-{codec}", 1)

    def produce(codec: str) -> ToolRun:
        values = [f"{codec}-{i}" for i in range(20)]
        return tools.produce(f"kt-codec-{codec}", values, "--compression-codec", codec)

    with ThreadPoolExecutor(len(CODECS)) as pool:
        list(pool.map(produce, CODECS))
    for codec in CODECS:  # the batches are stored as the producer compressed them
        assert stored_codecs(broker, f"kt-codec-{codec}") == {CODEC_IDS[codec]}, codec
    read = tools.consume("--include", "kt-codec-.*", count=20 * len(CODECS))
    assert sorted(read.lines) == sorted(f"{c}-{i}" for c in CODECS for i in range(20)), read


def test_console_consumer_group_protocol_consumer(tools: Tools) -> None:
    create_topic(tools.bootstrap, "kt-kip848", 2)
    tools.produce("kt-kip848", [f"m{i}" for i in range(10)])
    read = tools.consume(
        "--topic", "kt-kip848", "--group", "kt-kip848-g",
        "--consumer-property", "group.protocol=consumer",
        count=10,
    )  # fmt: skip
    # Kafka 4.4 prints that --consumer-property is deprecated (for --command-property).
    values = [x for x in read.lines if not x.startswith("Option --consumer-property")]
    assert sorted(values) == sorted(f"m{i}" for i in range(10)), read
    # The consumer committed what it read as it closed.
    rows = wait_until(lambda: tools.describe_group("kt-kip848-g") or None)
    assert sum(current for current, _, _ in rows.values()) == 10, rows
    assert all(lag == 0 for _, _, lag in rows.values()), rows
