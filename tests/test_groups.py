"""Consumer groups with real clients: shared partitions, rebalances, durable offsets, exact lag."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.group_members import MEMBERS, ConfluentMember, Member, wait_stable
from tests.harness import ROOT, BrokerProcess, BrokerThread, scrape, total, wait_until

PARTITIONS = 6
GROUP_SETTINGS = {"group_initial_rebalance_delay_ms": 1000, "group_min_session_timeout_ms": 1000}


def produce(bootstrap: str, topic: str, values: list[bytes]) -> dict[int, int]:
    """Produce ``values`` keyed round-robin; returns messages per partition."""
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "log.connection.close": False}
    )
    counts: Counter[int] = Counter()

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        counts[msg.partition()] += 1

    for i, value in enumerate(values):
        producer.produce(topic, value, str(i).encode(), on_delivery=delivered)
    assert producer.flush(15) == 0
    return dict(counts)


def read_everything(
    members: list[Member], expected: set[bytes], timeout: float = 30
) -> Counter[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = Counter(v for m in members for _, _, v in m.read)
        if set(seen) >= expected:
            break
        for m in members:
            if m.error is not None:
                raise m.error
        time.sleep(0.1)
    time.sleep(0.5)  # anything read twice would arrive now
    return Counter(v for m in members for _, _, v in m.read)


def stop_all(members: list[Member]) -> None:
    for m in members:
        m.stop()
    for m in members:
        m.join(20)


@pytest.mark.parametrize("client", list(MEMBERS))
def test_three_members_share_six_partitions(tmp_path: Path, client: str) -> None:
    with BrokerThread(tmp_path / "data", **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "shared", PARTITIONS, {})
        members = [MEMBERS[client](b.bootstrap, "g-" + client, "shared", f"m{i}") for i in range(3)]
        for m in members:
            m.start()
        try:
            wait_stable(members, PARTITIONS)
            assert [len(m.assigned) for m in members] == [2, 2, 2]
            values = [f"msg-{i}".encode() for i in range(300)]
            produce(b.bootstrap, "shared", values)
            seen = read_everything(members, set(values))
            assert set(seen) == set(values), "nothing lost"
            assert max(seen.values()) == 1, "every message read once"
            for m in members:
                assert {p for p, _, _ in m.read} <= m.assigned, "members read only their partitions"
        finally:
            stop_all(members)
        s = b.scrape()
        assert total(s, "streambus_consumer_group_lag", group="g-" + client) == 0


def test_member_leaving_hands_its_partitions_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with BrokerThread(tmp_path / "data", **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "handover", PARTITIONS, {})
        members: list[Member] = [
            ConfluentMember(b.bootstrap, "leavers", "handover", f"m{i}") for i in range(3)
        ]
        for m in members:
            m.start()
        try:
            wait_stable(members, PARTITIONS)
            first = [f"before-{i}".encode() for i in range(200)]
            produce(b.bootstrap, "handover", first)
            read_everything(members, set(first))
            leaving = members.pop()
            started = time.monotonic()
            leaving.stop()  # close(): LeaveGroup
            wait_stable(members, PARTITIONS)
            rebalance_s = time.monotonic() - started
            assert sorted(len(m.assigned) for m in members) == [3, 3]
            second = [f"after-{i}".encode() for i in range(200)]
            produce(b.bootstrap, "handover", second)
            seen = read_everything([*members, leaving], set(first) | set(second))
            assert set(seen) == set(first) | set(second), "nothing lost"
            assert max(seen.values()) == 1, "nothing read twice after the last commit"
            with capsys.disabled():
                print(
                    "\n[rebalance after LeaveGroup, 3 -> 2 confluent-kafka members: "
                    f"{rebalance_s:.2f} s]"
                )
            s = b.scrape()
            assert total(s, "streambus_consumer_group_members_total", group="leavers") == 2
        finally:
            stop_all(members)


def test_killed_member_is_evicted_after_its_session_timeout(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "evict", PARTITIONS, {})
        members: list[Member] = [
            ConfluentMember(b.bootstrap, "killers", "evict", f"m{i}") for i in range(2)
        ]
        for m in members:
            m.start()
        victim = subprocess.Popen(
            [sys.executable, "-m", "tests.group_members", b.bootstrap, "killers", "evict"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert victim.stdout is not None
        try:
            line = victim.stdout.readline()
            assert line.startswith("ASSIGNED "), line
            victim_partitions = {int(p) for p in line.split()[1].split(",")}
            wait_until(
                lambda: (
                    sum(len(m.assigned) for m in members) == PARTITIONS - len(victim_partitions)
                ),
                30,
            )
            first = [f"one-{i}".encode() for i in range(120)]
            counts = produce(b.bootstrap, "evict", first)
            victim_count = sum(counts.get(p, 0) for p in victim_partitions)
            victim_read: list[bytes] = []
            while len(victim_read) < victim_count:
                text = victim.stdout.readline()
                if text.startswith("READ "):
                    victim_read.append(text.split()[3].encode())
            read_everything(members, set(first) - set(victim_read))
            victim.send_signal(signal.SIGKILL)  # no LeaveGroup: only the session timeout tells
            victim.wait(10)
            killed = time.monotonic()
            wait_stable(members, PARTITIONS, timeout=30)
            took = time.monotonic() - killed
            assert took >= 2.0, "the member was evicted by its session timeout (3 s), not before"
            second = [f"two-{i}".encode() for i in range(120)]
            produce(b.bootstrap, "evict", second)
            seen = read_everything(members, set(second))
            seen.update(victim_read)
            assert set(seen) == set(first) | set(second)
            assert max(seen.values()) == 1
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait(10)
            victim.stdout.close()
            stop_all(members)


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat comes with `make install`")
def test_kcat_balanced_consumer(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "kc", 3, {})
        values = [f"kcat-{i}".encode() for i in range(60)]
        produce(b.bootstrap, "kc", values)
        out = subprocess.run(
            [
                "kcat",
                "-b",
                b.bootstrap,
                "-G",
                "kcat-group",
                "-X",
                "auto.offset.reset=earliest",
                "-e",
                "-q",
                "-f",
                "%s\n",
                "kc",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert sorted(out.stdout.split()) == sorted(v.decode() for v in values)
        s = b.scrape()
        assert total(s, "streambus_consumer_groups_total") >= 1
        assert (
            "streambus_consumer_group_lag",
            (("broker_id", "1"), ("group", "kcat-group"), ("partition", "0"), ("topic", "kc")),
        ) in s


def test_committed_offsets_survive_restart_and_sigkill(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, TopicPartition

    broker = BrokerProcess(tmp_path / "data", "--topic-config", "segment.bytes=100000").start()
    try:
        produce(broker.bootstrap, "durable-offsets", [f"v{i}".encode() for i in range(90)])
        config = {
            "bootstrap.servers": broker.bootstrap,
            "group.id": "keeper",
            "enable.auto.commit": False,
            "log.connection.close": False,
        }
        consumer = Consumer(config)
        wanted = [TopicPartition("durable-offsets", 0, 37)]
        consumer.commit(offsets=wanted, asynchronous=False)  # acknowledged: must survive
        consumer.close()
        assert broker.stop() == 0  # graceful restart first
        broker.start()
        consumer = Consumer(config)
        (got,) = consumer.committed([TopicPartition("durable-offsets", 0)], timeout=10)
        assert got.offset == 37
        consumer.commit(offsets=[TopicPartition("durable-offsets", 0, 61)], asynchronous=False)
        consumer.close()
        broker.kill()  # SIGKILL right after the commit was acknowledged
        broker.start()
        consumer = Consumer(config)
        (got,) = consumer.committed([TopicPartition("durable-offsets", 0)], timeout=10)
        assert got.offset == 61
        consumer.close()
        s = scrape(f"http://127.0.0.1:{broker.metrics_port}/metrics")
        assert total(s, "streambus_consumer_group_lag", group="keeper") == 90 - 61
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.stop()


def test_lag_is_exact_at_each_step(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, TopicPartition

    with BrokerThread(tmp_path / "data") as b:
        b.run(b.broker.create_topic, "lagging", 3, {})
        counts = produce(b.bootstrap, "lagging", [f"v{i}".encode() for i in range(150)])
        n = sum(counts.values())
        consumer = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": "lag-group",
                "enable.auto.commit": False,
                "log.connection.close": False,
            }
        )

        def lag() -> float:
            return total(b.scrape(), "streambus_consumer_group_lag", group="lag-group")

        committed = {p: min(counts.get(p, 0), 10 * (p + 1)) for p in range(3)}
        consumer.commit(
            offsets=[TopicPartition("lagging", p, o) for p, o in committed.items()],
            asynchronous=False,
        )
        assert lag() == n - sum(committed.values())
        for p, offset in committed.items():
            series = total(
                b.scrape(), "streambus_consumer_group_lag", group="lag-group", partition=str(p)
            )
            assert series == counts.get(p, 0) - offset
        more = produce(b.bootstrap, "lagging", [b"x"] * 40)
        assert lag() == n + sum(more.values()) - sum(committed.values())
        ends = {p: counts.get(p, 0) + more.get(p, 0) for p in range(3)}
        consumer.commit(
            offsets=[TopicPartition("lagging", p, o) for p, o in ends.items()], asynchronous=False
        )
        assert lag() == 0
        consumer.close()


def test_group_rounds_and_commits_are_traced(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with BrokerThread(tmp_path / "data", tracer_provider=provider, **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "traced-group", 2, {})
        member = ConfluentMember(b.bootstrap, "traced", "traced-group", "m0")
        member.start()
        try:
            wait_stable([member], 2)
            produce(b.bootstrap, "traced-group", [b"a", b"b", b"c"])
            read_everything([member], {b"a", b"b", b"c"})
        finally:
            stop_all([member])
    names = Counter(s.name for s in exporter.get_finished_spans())
    assert names["join traced"] >= 1
    assert names["sync traced"] >= 1
    assert names["commit traced"] >= 1
    for span in exporter.get_finished_spans():
        if span.name.endswith(" traced"):
            assert (span.attributes or {})["messaging.consumer.group.name"] == "traced"


def test_admin_lists_describes_and_deletes_groups(tmp_path: Path) -> None:
    from confluent_kafka import ConsumerGroupState, KafkaException
    from confluent_kafka.admin import AdminClient

    with BrokerThread(tmp_path / "data", **GROUP_SETTINGS) as b:
        b.run(b.broker.create_topic, "admin-topic", 2, {})
        members: list[Member] = [
            ConfluentMember(b.bootstrap, "admin-g", "admin-topic", f"m{i}") for i in range(2)
        ]
        for m in members:
            m.start()
        admin = AdminClient({"bootstrap.servers": b.bootstrap, "log.connection.close": False})
        try:
            wait_stable(members, 2)
            produce(b.bootstrap, "admin-topic", [b"a", b"b", b"c", b"d"])
            read_everything(members, {b"a", b"b", b"c", b"d"})
            listed = admin.list_consumer_groups().result(10)
            assert [g.group_id for g in listed.valid] == ["admin-g"]
            (described,) = admin.describe_consumer_groups(["admin-g"]).values()
            group = described.result(10)
            assert group.state == ConsumerGroupState.STABLE
            assert len(group.members) == 2
            assigned = sorted(
                p.partition for m in group.members for p in m.assignment.topic_partitions
            )
            assert assigned == [0, 1]
            with pytest.raises(KafkaException, match="NON_EMPTY_GROUP"):
                admin.delete_consumer_groups(["admin-g"])["admin-g"].result(10)
        finally:
            stop_all(members)
        wait_until(
            lambda: (
                total(b.scrape(), "streambus_consumer_group_members_total", group="admin-g") == 0
            )
        )
        admin.delete_consumer_groups(["admin-g"])["admin-g"].result(10)
        s = b.scrape()
        assert total(s, "streambus_consumer_groups_total") == 0
        assert total(s, "streambus_consumer_group_lag", group="admin-g") == 0
        with pytest.raises(KafkaException, match="GROUP_ID_NOT_FOUND"):
            admin.delete_consumer_groups(["admin-g"])["admin-g"].result(10)


def test_offsets_written_under_an_earlier_placement_still_load_but_never_win(
    tmp_path: Path,
) -> None:
    """Committed offsets are placed by Kafka's hash of the group id. A data dir whose records
    sit in another partition (an earlier placement) keeps them, unless the group's own
    partition holds something about the same topic-partition: that is newer."""
    from streambus.cluster.state import coordinator_partition
    from streambus.groups.offsets import OffsetAndMetadata, encode_key, encode_value
    from streambus.partitions import OFFSETS_TOPIC
    from streambus.records import build_batch
    from streambus.structs import TopicPartition as Tp

    data = tmp_path / "data"
    tp = Tp("events", 0)
    with BrokerThread(data) as broker:
        groups = broker.broker.groups

        def write() -> int:
            groups.offsets.commit("keeper", {tp: OffsetAndMetadata(37, -1, "", 1)})
            count = broker.broker.partitions.topics()[OFFSETS_TOPIC].partitions
            home = coordinator_partition("keeper", count)
            elsewhere = (home + 1) % count  # read after the home partition, unless it wraps
            old = OffsetAndMetadata(5, -1, "", 0)
            batch = build_batch(
                [
                    (encode_key("keeper", tp), encode_value(old), [], 0),
                    (encode_key("legacy", tp), encode_value(old), [], 0),
                ]
            )
            broker.broker.partitions.append_now(Tp(OFFSETS_TOPIC, elsewhere), batch)
            return count

        broker.run(write)
    with BrokerThread(data) as broker:
        loaded = broker.run(
            lambda: {g: broker.broker.groups.committed(g) for g in ("keeper", "legacy")}
        )
    assert loaded["keeper"][tp].offset == 37
    assert loaded["legacy"][tp].offset == 5
