"""Fetch sessions (KIP-227) through real sockets: raw frames that open a session, fetch
incrementally, forget a partition and use a wrong epoch or an unknown session; and
kafka-python, whose consumer fetches incrementally, reading many partitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from kafka.protocol.consumer import FetchRequest as F

from tests.harness import BrokerThread, RawClient, wait_until

TOPIC = "sessions"
V = 12


def _produce(bootstrap: str, partition: int, value: bytes, topic: str = TOPIC) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    producer.produce(topic, value, partition=partition)
    assert producer.flush(15) == 0


def _fetch(
    client: RawClient,
    session_id: int,
    epoch: int,
    offsets: dict[int, int],
    forgotten: list[int] | None = None,
) -> Any:
    request = F(
        replica_id=-1,
        max_wait_ms=0,
        min_bytes=0,
        max_bytes=1 << 20,
        isolation_level=0,
        session_id=session_id,
        session_epoch=epoch,
        forgotten_topics_data=(
            [F.ForgottenTopic(topic=TOPIC, partitions=forgotten)] if forgotten else []
        ),
        rack_id="",
        topics=(
            [
                F.FetchTopic(
                    topic=TOPIC,
                    partitions=[
                        F.FetchTopic.FetchPartition(
                            partition=p,
                            current_leader_epoch=-1,
                            fetch_offset=o,
                            log_start_offset=-1,
                            partition_max_bytes=1 << 20,
                        )
                        for p, o in offsets.items()
                    ],
                )
            ]
            if offsets
            else []
        ),
    )
    return client.request(request, V)


def _answered(response: Any) -> dict[int, Any]:
    return {p.partition_index: p for t in response.responses for p in t.partitions}


def test_a_session_answers_only_partitions_with_something_new(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", num_partitions=3) as b:
        _produce(b.bootstrap, 0, b"zero")
        _produce(b.bootstrap, 1, b"one")
        with RawClient(b.bootstrap) as client:
            full = _fetch(client, 0, 0, {0: 0, 1: 1, 2: 0})
            assert full.error_code == 0
            assert full.session_id != 0
            session = full.session_id
            first = _answered(full)
            assert set(first) == {0, 1, 2}  # a full response names every partition
            assert first[0].records
            assert not first[1].records
            assert first[1].high_watermark == 1

            # Incremental, offset of partition 0 moved past its record: nothing is new.
            quiet = _fetch(client, session, 1, {0: 1})
            assert quiet.error_code == 0
            assert quiet.session_id == session
            assert _answered(quiet) == {}

            _produce(b.bootstrap, 1, b"one more")
            news = _answered(_fetch(client, session, 2, {}))
            assert set(news) == {1}  # partitions 0 and 2 have nothing new: left out
            assert news[1].records
            assert news[1].high_watermark == 2

            # Partition 1 forgotten: its new data is no longer fetched; 2 still is.
            _produce(b.bootstrap, 1, b"unseen")
            _produce(b.bootstrap, 2, b"two")
            after = _answered(_fetch(client, session, 3, {1: 2}, forgotten=[1]))
            assert set(after) == {2}
            assert after[2].records

            wrong = _fetch(client, session, 9, {})
            assert wrong.error_code == 71
            assert wrong.session_id == 0
            assert wrong.responses == []
            unknown = _fetch(client, session + 1 if session < 2**31 - 1 else 1, 1, {})
            assert unknown.error_code == 70
            assert unknown.responses == []

            # The session survived the wrong epoch; a full request with epoch -1 closes it.
            assert _fetch(client, session, 4, {}).error_code == 0
            closed = _fetch(client, session, -1, {0: 0})
            assert closed.session_id == 0
            assert set(_answered(closed)) == {0}
            assert _fetch(client, session, 5, {}).error_code == 70
        errors = b.scrape()
        assert any(
            n == "streambus_network_errors_total"
            and ("error", "INVALID_FETCH_SESSION_EPOCH") in lbls
            for n, lbls in errors
        )


def test_the_session_cache_is_bounded_and_evicts_the_least_valuable(tmp_path: Path) -> None:
    with BrokerThread(
        tmp_path / "data", num_partitions=3, max_incremental_fetch_session_cache_slots=1
    ) as b:
        _produce(b.bootstrap, 0, b"x")
        with RawClient(b.bootstrap) as one, RawClient(b.bootstrap) as two:
            small = _fetch(one, 0, 0, {0: 0}).session_id
            assert small != 0
            # A session of more partitions is worth the slot; the smaller one goes.
            large = _fetch(two, 0, 0, {0: 0, 1: 0, 2: 0}).session_id
            assert large != 0
            assert _fetch(one, small, 1, {}).error_code == 70
            # A smaller one does not evict it: it is answered, without a session.
            again = _fetch(one, 0, 0, {0: 0})
            assert again.session_id == 0
            assert set(_answered(again)) == {0}
            assert _fetch(two, large, 1, {}).error_code == 0
        assert b.run(len, b.broker.fetch_sessions) == 1


def test_kafka_python_reads_many_partitions_through_a_fetch_session(tmp_path: Path) -> None:
    from kafka import KafkaConsumer, TopicPartition

    partitions, per_partition = 24, 20
    with BrokerThread(tmp_path / "data", num_partitions=partitions) as b:
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 5})
        sent = set()
        for p in range(partitions):
            for i in range(per_partition):
                value = f"{p}-{i}".encode()
                producer.produce("many", value, partition=p)
                sent.add((p, value))
        assert producer.flush(15) == 0
        consumer = KafkaConsumer(
            bootstrap_servers=b.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
        )
        consumer.assign([TopicPartition("many", p) for p in range(partitions)])
        consumer.seek_to_beginning()
        got: list[tuple[int, bytes]] = []

        def read_all() -> bool:
            for records in consumer.poll(200).values():
                got.extend((r.partition, r.value) for r in records)
            return len(got) >= len(sent)

        wait_until(read_all, timeout=30, interval=0)
        # More arrives while the session is open: incremental fetches carry it.
        for p in range(0, partitions, 5):
            producer.produce("many", f"{p}-late".encode(), partition=p)
            sent.add((p, f"{p}-late".encode()))
        assert producer.flush(15) == 0
        wait_until(read_all, timeout=30, interval=0)
        sessions = b.run(len, b.broker.fetch_sessions)
        consumer.close()
        assert sorted(got) == sorted(sent)  # every record once, none twice
        assert sessions >= 1  # the consumer fetched through a session


TOOLS_LIBS = Path(__file__).resolve().parents[1] / ".tools" / "kafka-tools-4.4.0" / "libs"


def test_kafkas_java_consumer_reads_through_incremental_fetch_sessions(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import threading

    import pytest

    java = shutil.which("java")
    if java is None or not any(TOOLS_LIBS.glob("kafka-tools-*.jar")):
        pytest.skip("needs java and Kafka's tool jars in .tools/kafka-tools-4.4.0/libs")
    partitions = 12
    with BrokerThread(tmp_path / "data", num_partitions=partitions) as b:
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 5})
        sent = {f"{p}-{i}" for p in range(partitions) for i in range(10)}
        for value in sorted(sent):
            producer.produce("java", value.encode(), partition=int(value.split("-")[0]))
        assert producer.flush(15) == 0
        late = {f"late-{p}" for p in range(partitions)}
        consumer = subprocess.Popen(
            [
                java,
                "-cp",
                f"{TOOLS_LIBS}/*",
                "org.apache.kafka.tools.consumer.ConsoleConsumer",
                "--bootstrap-server",
                b.bootstrap,
                "--topic",
                "java",
                "--from-beginning",
                "--max-messages",
                str(len(sent) + len(late)),
                "--timeout-ms",
                "60000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: list[str] = []

        def read() -> None:
            assert consumer.stdout is not None
            lines.extend(line.strip() for line in consumer.stdout)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: len(lines) >= len(sent), timeout=90)
            # Read so far, the consumer is fetching through its session: the rest comes
            # in incremental fetches.
            assert b.run(len, b.broker.fetch_sessions) >= 1
            for value in sorted(late):
                producer.produce("java", value.encode(), partition=int(value.split("-")[1]))
            assert producer.flush(15) == 0
            assert consumer.wait(90) == 0
        finally:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait()
        reader.join(10)
        assert consumer.stdout is not None
        consumer.stdout.close()
        assert sorted(lines) == sorted(sent | late)
