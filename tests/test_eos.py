"""Exactly-once under SIGKILL: of the pipeline process, and of the broker.

* An exactly-once consume-transform-produce pipeline (``tests/eos_pipeline.py``: read_committed
  consumer, transactional producer, ``send_offsets_to_transaction``) runs as a child process
  while the test feeds its input topic; the test SIGKILLs it at a random point after it has
  committed at least once, STREAMBUS_EOS_ROUNDS times (3 in ``make test``, more in
  ``make soak``), restarting it with the same transactional id each time; a last run drains
  the input. The output topic read with read_committed then holds every input record exactly
  once, and the group's offsets stand at the input's end.
* The broker SIGKILLed mid-transaction (records written, no EndTxn yet) and SIGKILLed while
  the markers of a transaction over many partitions are being written: after the restart every
  transaction is visible to read_committed readers in all of its partitions or in none, an
  aborted one never, and the last stable offset reaches the high watermark again.

All against ``streambus serve`` processes (``BrokerProcess``) with confluent-kafka clients.
Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from confluent_kafka.cimpl import NewTopic
from kafka.protocol.metadata.find_coordinator import FindCoordinatorRequest

from tests.harness import ROOT, BrokerProcess, ClusterProcesses, RawClient, wait_until
from tests.test_cluster import CLUSTER_ENV, wait_cluster_size

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("STREAMBUS_EOS_ROUNDS", "3"))
SEED = int(os.environ.get("STREAMBUS_EOS_SEED", str(time.time_ns() % 2**32)))
PIPELINE = ROOT / "tests" / "eos_pipeline.py"
TIMEOUT_S = 60.0
FEED_PER_S = 300  # input records a second while the pipeline is killed and restarted
INPUT_PARTITIONS = 3
WIDE_PARTITIONS = 48  # one transaction over this many partitions: many markers to write
STATE_TOPIC = "__transaction_state"


# -- helpers ---------------------------------------------------------------------------------


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def txn_producer(bootstrap: str, transactional_id: str) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": 60_000,
            "linger.ms": 5,
        }
    )
    producer.init_transactions(TIMEOUT_S)
    return producer


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    headers: dict[str, bytes]


@dataclass
class Read:
    records: list[Record]
    # partition -> the offset a reader reached its end at: the LSO for read_committed.
    end: dict[tuple[str, int], int]
    high: dict[tuple[str, int], int]  # partition -> high watermark


def read_all(bootstrap: str, topic: str, isolation: str) -> Read:
    """Every record of ``topic`` a fresh ``isolation`` reader sees, up to the end it reports
    (librdkafka signals a partition's end at the LSO under read_committed)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{os.getpid()}",
            "isolation.level": isolation,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = len(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        records: list[Record] = []
        end: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + TIMEOUT_S
        while len(end) < partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: the end of {sorted(end)} only, {len(records)} read")
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        end[(topic, msg.partition())] = msg.offset()
                        continue
                    raise KafkaException(err)
                value = msg.value()
                assert value is not None
                headers = {k: bytes(v or b"") for k, v in msg.headers() or []}
                records.append(Record(topic, msg.partition(), msg.offset(), value, headers))
    finally:
        consumer.close()
    return Read(records, end, high_watermarks(bootstrap, topic, partitions))


def high_watermarks(bootstrap: str, topic: str, partitions: int) -> dict[tuple[str, int], int]:
    """Each partition's high watermark, in one ListOffsets (read_uncommitted, latest)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.list_offsets(
        {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)},
        isolation_level=IsolationLevel.READ_UNCOMMITTED,
        request_timeout=30,
    )
    return {(tp.topic, tp.partition): f.result(30).offset for tp, f in futures.items()}


def settled_read(bootstrap: str, topic: str) -> Read:
    """A read_committed read once no transaction holds the topic back (each partition's LSO
    at its high watermark): after a restart the coordinator finishes what it had decided."""
    last: list[Read] = []

    def settled() -> bool:
        last[:] = [read_all(bootstrap, topic, "read_committed")]
        return last[0].end == last[0].high

    try:
        wait_until(settled, TIMEOUT_S, 0.2)
    except TimeoutError:
        raise AssertionError(f"{topic}: LSO {last[0].end} short of {last[0].high}") from None
    return last[0]


class Feeder:
    """A thread writing ``rec-<n>`` records to the input topic with an idempotent producer at
    FEED_PER_S a second (round robin over the partitions) until stopped."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        self.topic = topic
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.errors.append(str(err))

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * FEED_PER_S) + 1
            while self.sent < due:
                self.producer.produce(
                    self.topic,
                    f"rec-{self.sent:07d}".encode(),
                    partition=self.sent % INPUT_PARTITIONS,
                    on_delivery=self._delivered,
                )
                self.sent += 1
            self.producer.poll(0.01)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        left = self.producer.flush(TIMEOUT_S)
        assert left == 0, f"{left} input records undelivered"
        assert not self.errors, f"input delivery errors: {self.errors[:3]}"

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)


class Pipeline:
    """tests/eos_pipeline.py as a child process, its output in a log file per run."""

    def __init__(self, log_dir: Path, bootstrap: str, txn_id: str) -> None:
        self.log_dir = log_dir
        self.args = [bootstrap, "eos-in", "eos-out", "eos-group", txn_id, "--work-ms", "20"]
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "pipeline-0.log"

    def start(self, *extra: str) -> None:
        self.runs += 1
        self.log_path = self.log_dir / f"pipeline-{self.runs}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(PIPELINE), *self.args, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def commits(self) -> int:
        return self.log().count("committed ")

    def committed_or_exited(self) -> bool:
        """This run committed a transaction, or ended."""
        assert self.proc is not None
        return self.commits() > 0 or self.proc.poll() is not None

    def kill(self) -> int:
        """SIGKILL; the exit code (negative when the signal did it, else it had exited)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data") as b:
        yield b


# -- the pipeline ----------------------------------------------------------------------------


@pytest.mark.timeout(90 + 30 * ROUNDS)  # make soak runs many more rounds than make test
def test_exactly_once_pipeline_survives_sigkill(broker: BrokerProcess, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    create_topic(broker.bootstrap, "eos-in", INPUT_PARTITIONS)
    create_topic(broker.bootstrap, "eos-out", INPUT_PARTITIONS)
    pipeline = Pipeline(tmp_path, broker.bootstrap, "eos-pipeline")
    crashed = 0  # runs that ended by themselves (an error) before the kill
    try:
        with Feeder(broker.bootstrap, "eos-in") as feeder:
            for round_ in range(1, ROUNDS + 1):
                pipeline.start()
                try:
                    wait_until(pipeline.committed_or_exited, TIMEOUT_S, 0.02)
                except TimeoutError:
                    raise AssertionError(
                        f"no commit in round {round_}:\n{pipeline.log()}"
                    ) from None
                # The kill point: anywhere in the next 0-1.5 s of begin/produce/commit work.
                time.sleep(rng.uniform(0, 1.5))
                code = pipeline.kill()
                if code != -signal.SIGKILL:
                    crashed += 1
                    print(f"round {round_}: the pipeline exited {code} before the kill")
                    print(pipeline.log()[-2000:])
                print(
                    f"round {round_}: killed after {pipeline.commits()} commits, "
                    f"{feeder.sent} input records so far"
                )
            feeder.stop()
            inputs = feeder.sent
        pipeline.start("--exit-at-end")
        assert pipeline.proc is not None
        code = pipeline.proc.wait(180)
        assert code == 0, f"the last run exited {code}:\n{pipeline.log()}"
    finally:
        pipeline.close()

    source = read_all(broker.bootstrap, "eos-in", "read_uncommitted")
    assert len(source.records) == inputs
    by_origin = {(r.partition, r.offset): r.value for r in source.records}
    out = settled_read(broker.bootstrap, "eos-out")
    everything = read_all(broker.bootstrap, "eos-out", "read_uncommitted")
    seen: Counter[tuple[int, int]] = Counter()
    for r in out.records:
        origin = (int(r.headers["in-partition"]), int(r.headers["in-offset"]))
        assert r.partition == origin[0]
        assert r.value == by_origin[origin].upper(), (r, by_origin.get(origin))
        seen[origin] += 1
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    losses = len(set(by_origin) - set(seen))
    print(
        f"\neos pipeline (seed {SEED}): {ROUNDS} kill rounds, {pipeline.runs} runs, "
        f"{crashed} exited on their own; {inputs} input records, {len(out.records)} output "
        f"records read_committed, {duplicates} duplicates, {losses} losses; "
        f"{len(everything.records) - len(out.records)} aborted output records "
        f"(seen by read_uncommitted only)"
    )
    assert duplicates == 0
    assert losses == 0
    assert len(out.records) == inputs
    # The group's offsets went in with the output: they stand at the input's end.
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "eos-group"})
    try:
        committed = consumer.committed(
            [TopicPartition("eos-in", p) for p in range(INPUT_PARTITIONS)], timeout=30
        )
    finally:
        consumer.close()
    assert {("eos-in", tp.partition): tp.offset for tp in committed} == source.high


# -- the broker killed -----------------------------------------------------------------------


def values(read: Read, prefix: bytes) -> set[bytes]:
    return {r.value for r in read.records if r.value.startswith(prefix)}


def produce_all(producer: Producer, topic: str, prefix: str, partitions: int) -> set[bytes]:
    """Two records per partition of ``topic`` in the open transaction; their values."""
    sent = set()
    for p in range(partitions):
        for i in range(2):
            value = f"{prefix}-p{p}-{i}".encode()
            producer.produce(topic, value, partition=p)
            sent.add(value)
    assert producer.flush(TIMEOUT_S) == 0
    return sent


def test_broker_sigkill_mid_transaction(broker: BrokerProcess) -> None:
    create_topic(broker.bootstrap, "mid", INPUT_PARTITIONS)
    before = txn_producer(broker.bootstrap, "mid-before")
    before.begin_transaction()
    committed = produce_all(before, "mid", "committed", INPUT_PARTITIONS)
    before.commit_transaction(TIMEOUT_S)
    before.begin_transaction()
    aborted = produce_all(before, "mid", "aborted", INPUT_PARTITIONS)
    before.abort_transaction(TIMEOUT_S)
    # Two transactions open, their records acknowledged, when the broker dies.
    finisher = txn_producer(broker.bootstrap, "mid-finished")
    finisher.begin_transaction()
    finished = produce_all(finisher, "mid", "finished", INPUT_PARTITIONS)
    abandoned_producer = txn_producer(broker.bootstrap, "mid-abandoned")
    abandoned_producer.begin_transaction()
    abandoned = produce_all(abandoned_producer, "mid", "abandoned", INPUT_PARTITIONS)

    broker.kill()
    broker.start()
    # The coordinator reloads both as Ongoing: one is committed by its producer, the other
    # aborted when a new producer with its transactional id fences the old one.
    finisher.commit_transaction(TIMEOUT_S)
    txn_producer(broker.bootstrap, "mid-abandoned")
    with pytest.raises(KafkaException) as fenced:
        abandoned_producer.commit_transaction(TIMEOUT_S)
    print(f"\nthe fenced producer's commit: {fenced.value.args[0]}")

    got = settled_read(broker.bootstrap, "mid")
    assert values(got, b"committed") == committed
    assert values(got, b"finished") == finished
    assert values(got, b"aborted") == set()
    assert values(got, b"abandoned") == set()
    everything = read_all(broker.bootstrap, "mid", "read_uncommitted")
    assert values(everything, b"abandoned") == abandoned
    assert values(everything, b"aborted") == aborted
    print(
        f"broker killed mid-transaction: {len(got.records)} records read_committed, "
        f"{len(everything.records)} read_uncommitted; LSO = high watermark {got.high}"
    )


def log_sizes(data_dir: Path, topic: str) -> dict[int, int]:
    """partition -> the bytes of its segment files (markers grow them)."""
    sizes: dict[int, int] = {}
    topic_dir = data_dir / "topics" / topic
    if not topic_dir.is_dir():
        return sizes
    for part in topic_dir.iterdir():
        if part.name.isdigit():
            total = 0
            for f in part.glob("*.log"):
                with contextlib.suppress(FileNotFoundError):  # a segment deleted meanwhile
                    total += f.stat().st_size
            sizes[int(part.name)] = total
    return sizes


def test_broker_sigkill_while_writing_markers(broker: BrokerProcess) -> None:
    create_topic(broker.bootstrap, "wide", WIDE_PARTITIONS)
    # The kill: as soon as the first marker lands in any partition of the transaction, or as
    # soon as __transaction_state grows after EndTxn (PrepareCommit/PrepareAbort written,
    # no marker yet).
    plan = [(True, "wide"), (False, "wide"), (True, STATE_TOPIC), (False, STATE_TOPIC)]
    for round_, (commit, watched) in enumerate(plan, start=1):
        txn_id = f"wide-{round_}"
        producer = txn_producer(broker.bootstrap, txn_id)
        producer.begin_transaction()
        prefix = f"r{round_}"
        sent = produce_all(producer, "wide", prefix, WIDE_PARTITIONS)
        sizes = log_sizes(broker.data_dir, "wide")
        state_sizes = log_sizes(broker.data_dir, STATE_TOPIC)
        watched_sizes = sizes if watched == "wide" else state_sizes
        result: list[BaseException | None] = []

        def end(
            p: Producer = producer, c: bool = commit, out: list[BaseException | None] = result
        ) -> None:
            try:
                if c:
                    p.commit_transaction(TIMEOUT_S)
                else:
                    p.abort_transaction(TIMEOUT_S)
                out.append(None)
            except KafkaException as exc:
                out.append(exc)

        ender = threading.Thread(target=end, daemon=True)
        ender.start()
        # The client's answer may come before the markers (Kafka answers EndTxn once the
        # Prepare* state is written): the watch goes on a little past it.
        deadline = time.monotonic() + TIMEOUT_S
        grace: float | None = None
        while time.monotonic() < deadline:
            now = log_sizes(broker.data_dir, watched)
            if any(now.get(p, 0) > size for p, size in watched_sizes.items()):
                break
            if result:
                grace = grace or time.monotonic() + 5
                if time.monotonic() > grace:
                    break
        broker.kill()
        now = log_sizes(broker.data_dir, "wide")
        marked = sum(now[p] > sizes[p] for p in sizes)
        answered = bool(result)
        broker.start()
        ender.join(TIMEOUT_S + 10)
        assert result, "the commit/abort call did not return"
        if result[0] is not None:
            # The client gave up: a new producer with the id completes whatever the
            # coordinator decided (a Prepare* state is finished, an Ongoing one aborted).
            txn_producer(broker.bootstrap, txn_id)
        began = time.monotonic()
        got = settled_read(broker.bootstrap, "wide")
        settle_s = time.monotonic() - began
        visible = values(got, prefix.encode() + b"-")
        # All or nothing, across all partitions; never an aborted record.
        assert visible in (set(), sent), f"{len(visible)}/{len(sent)} visible"
        if not commit:
            assert visible == set()
        if commit and result[0] is None:
            everything = read_all(broker.bootstrap, "wide", "read_uncommitted")
            assert visible == sent, (
                f"an acknowledged commit lost: {len(visible)}/{len(sent)} visible, "
                f"{len(values(everything, prefix.encode() + b'-'))} written; "
                f"markers in {marked} partitions at the kill, answered {answered}; "
                f"settled after {settle_s:.1f}s"
            )
        outcome = "committed" if visible else "aborted"
        print(
            f"\nround {round_} ({'commit' if commit else 'abort'}): SIGKILL on {watched} "
            f"growing, with markers in "
            f"{marked}/{WIDE_PARTITIONS} partitions, the client "
            f"{'had its answer' if answered else 'was waiting'}; after restart the client "
            f"{'succeeded' if result[0] is None else f'failed ({result[0]})'}, "
            f"the transaction {outcome}: {len(visible)}/{len(sent)} records visible "
            f"(settled {settle_s:.1f}s after the restart)"
        )


# -- three brokers: the coordinator killed ---------------------------------------------------


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[ClusterProcesses]:
    with ClusterProcesses(tmp_path, 3, env=CLUSTER_ENV) as c:
        wait_cluster_size(c, 3)
        yield c


def coordinator_of(cluster: ClusterProcesses, txn_id: str) -> int:
    """The node coordinating ``txn_id``, as a live broker answers FindCoordinator."""

    def ask() -> int | None:
        for broker in cluster.live().values():
            with contextlib.suppress(OSError), RawClient(broker.bootstrap) as client:
                found = client.request(FindCoordinatorRequest(key=txn_id, key_type=1), 2)
                if found.error_code == 0:
                    return int(found.node_id)
        return None

    return int(wait_until(ask, TIMEOUT_S, 0.2))


def wait_replicated(cluster: ClusterProcesses, topic: str, partitions: int) -> None:
    """Until every partition of ``topic`` has a leader and three in-sync replicas."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})

    def synced() -> bool:
        with contextlib.suppress(KafkaException):
            t = admin.list_topics(topic, timeout=5).topics.get(topic)
            return (
                t is not None
                and t.error is None
                and len(t.partitions) == partitions
                and all(p.leader >= 0 and len(p.isrs) == 3 for p in t.partitions.values())
            )
        return False

    wait_until(synced, 90, 0.2)


def test_coordinator_sigkill_at_end_txn_in_a_cluster(cluster3: ClusterProcesses) -> None:
    """The broker coordinating a transaction over partitions led by all three brokers is
    SIGKILLed just after EndTxn is sent; another broker takes over its __transaction_state
    partition and finishes the transaction, all or nothing."""
    rng = random.Random(SEED)
    partitions = 12
    admin = AdminClient({"bootstrap.servers": cluster3.bootstrap})
    admin.create_topics([NewTopic("cwide", partitions, 3)])["cwide"].result(60)
    wait_replicated(cluster3, "cwide", partitions)
    for round_, commit in enumerate((True, False, True), start=1):
        txn_id = f"cwide-{round_}"
        producer = txn_producer(cluster3.bootstrap, txn_id)
        node = coordinator_of(cluster3, txn_id)
        producer.begin_transaction()
        prefix = f"c{round_}"
        sent = produce_all(producer, "cwide", prefix, partitions)
        result: list[BaseException | None] = []

        def end(
            p: Producer = producer, c: bool = commit, out: list[BaseException | None] = result
        ) -> None:
            try:
                if c:
                    p.commit_transaction(TIMEOUT_S)
                else:
                    p.abort_transaction(TIMEOUT_S)
                out.append(None)
            except KafkaException as exc:
                out.append(exc)

        ender = threading.Thread(target=end, daemon=True)
        ender.start()
        delay = rng.uniform(0, 0.02)  # the kill point: within 20 ms of EndTxn going out
        time.sleep(delay)
        cluster3.brokers[node].kill()
        answered = bool(result)
        ender.join(TIMEOUT_S + 10)
        assert result, "the commit/abort call did not return"
        if result[0] is not None:
            txn_producer(cluster3.bootstrap, txn_id)
        got = settled_read(cluster3.bootstrap, "cwide")
        visible = values(got, prefix.encode() + b"-")
        assert visible in (set(), sent), f"{len(visible)}/{len(sent)} visible"
        if not commit:
            assert visible == set()
        if commit and result[0] is None:
            assert visible == sent, f"an acknowledged commit lost: {len(visible)} visible"
        print(
            f"\ncluster round {round_} ({'commit' if commit else 'abort'}): coordinator "
            f"{node} SIGKILLed {delay * 1000:.1f} ms after EndTxn went out (client "
            f"{'answered' if answered else 'waiting'}); the client "
            f"{'succeeded' if result[0] is None else f'failed ({result[0]})'}; "
            f"{len(visible)}/{len(sent)} visible with the coordinator down"
        )
        cluster3.brokers[node].start()
        wait_cluster_size(cluster3, 3)
        wait_replicated(cluster3, "cwide", partitions)
