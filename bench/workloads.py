"""The workloads, the same for StreamBus and Kafka: one confluent-kafka client, one setting.

* :func:`produce_throughput`: one producer (``linger.ms=5``, the given ``acks``, no key, no
  compression) sends a warm-up, then a timed count of messages; the clock runs from the first
  ``produce()`` to ``flush()`` returning. Every delivery report is checked. p50/p99 are the
  delivery latencies librdkafka measured (``produce()`` to acknowledgement) in the timed part.
* :func:`consume_throughput`: a fresh consumer, assigned every partition of the topic from the
  beginning (no group), reads the first messages as warm-up, then is timed until the rest of
  the topic's messages have arrived.
* :func:`e2e_latency`: a producer sends at a fixed rate, each value carrying a sequence number
  and its send time; a consumer thread in the same process, assigned from offset 0, takes
  receive time minus send time per message. The first ``warmup_s`` are dropped.
* :func:`scrape`: timed GETs of ``/metrics``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.common import cpu_seconds, machine_cpu

LINGER_MS = 5
FLUSH_TIMEOUT_S = 180.0
CONSUME_TIMEOUT_S = 180.0
CREATE_TIMEOUT_S = 120.0
# A warm-up stops after this many value bytes even if its time is not up: on this VM every
# page of page cache beyond about 2 GB is a fresh host page and costs ~10x more to write, so
# the data one broker turn writes is kept well under that.
WARMUP_MAX_BYTES = 128 * 10**6
# Errors a just-started broker may answer CreateTopics with; retried until the deadline.
_RETRIABLE_CREATE = {
    KafkaError.INVALID_REPLICATION_FACTOR,  # Kafka: the broker is not registered yet
    KafkaError.NOT_CONTROLLER,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}
_E2E_HEADER = struct.Struct("<QQ")  # sequence number, send time (perf_counter_ns)


def producer_config(bootstrap: str, acks: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "linger.ms": LINGER_MS, "acks": acks}


def consumer_config(bootstrap: str) -> dict[str, Any]:
    # group.id is required by the client even for assign(); no group is joined and nothing
    # is committed. fetch.queue.backoff.ms: librdkafka's default (1000) pauses fetching for a
    # whole second whenever its local queue passes queued.min.messages (100,000), which with
    # 100-byte values made both brokers look 4-5x slower than they are (the client idled).
    return {
        "bootstrap.servers": bootstrap,
        "group.id": "bench",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.queue.backoff.ms": 10,
    }


def settle_page_cache() -> float:
    """``sync()``: write back every dirty page before a timed window; seconds it took.

    Once the kernel holds more dirty page cache than ``vm.dirty_background_ratio`` allows
    (about 2 GB on a 24 GiB machine), writeback starts and every ``write()`` of a broker gets
    slower (Kafka's 1 KiB produce rate halved, its system CPU tripled). Without this a run
    would pay for the data the runs before it wrote, the other system's turn included.
    """
    started = time.monotonic()
    os.sync()
    return time.monotonic() - started


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic garbage collection in the bench process during a timed window: a full
    collection pauses every thread for tens of milliseconds, which would show up as
    latency of whichever broker was being measured. Collected once before and after."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, by linear interpolation; NaN if empty."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def create_topics(
    bootstrap: str, topics: Iterable[str], partitions: int, batch: int = 100
) -> float:
    """Create ``topics`` (``partitions`` each, replication 1); seconds it took.

    Retries what a just-started broker may answer; waits until the metadata lists every
    partition with a leader, so that a producer's first messages do not wait for it.
    """
    names = list(topics)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    started = time.monotonic()
    deadline = started + CREATE_TIMEOUT_S
    pending = list(names)
    while pending:
        created: list[str] = []
        for i in range(0, len(pending), batch):
            chunk = pending[i : i + batch]
            futures = admin.create_topics(
                [NewTopic(t, partitions, 1) for t in chunk], operation_timeout=60
            )
            for topic, future in futures.items():
                try:
                    future.result(timeout=CREATE_TIMEOUT_S)
                    created.append(topic)
                except KafkaException as exc:
                    err = exc.args[0]
                    if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                        created.append(topic)
                    elif err.code() not in _RETRIABLE_CREATE or time.monotonic() > deadline:
                        raise
        pending = [t for t in pending if t not in set(created)]
        if pending:
            time.sleep(0.2)
    want = set(names)
    while True:
        meta = admin.list_topics(timeout=30)
        ready = {
            name
            for name, t in meta.topics.items()
            if name in want
            and t.error is None
            and len(t.partitions) == partitions
            and all(p.leader >= 0 and p.error is None for p in t.partitions.values())
        }
        if ready == want:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(want - ready)} topics have no leaders yet")
        time.sleep(0.1)


def delete_topics(bootstrap: str, topics: list[str], data_dir: Path, timeout: float = 60) -> None:
    """Delete ``topics`` and wait until no file or directory named after them is left in
    ``data_dir`` (both brokers name partition directories after their topic)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics, operation_timeout=30).values():
        future.result(timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        # os.walk skips directories that vanish under it (the broker is deleting them).
        left = [
            os.path.join(root, d)
            for root, dirs, _files in os.walk(data_dir)
            for d in dirs
            if any(d == t or d.startswith((f"{t}-", f"{t}.")) for t in topics)
        ]
        if not left:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"deleted topics still on disk after {timeout:.0f}s: {left[:3]}")
        time.sleep(0.1)


@dataclass
class Delivery:
    """A delivery-report callback: counts, first errors, latencies, the longest gap."""

    keep_latency: bool = True
    ok: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    last_at: float = 0.0
    max_gap_s: float = 0.0

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        now = time.perf_counter()
        if self.last_at:
            self.max_gap_s = max(self.max_gap_s, now - self.last_at)
        self.last_at = now
        if err is None:
            self.ok += 1
            if self.keep_latency:
                latency = msg.latency()
                if latency is not None:
                    self.latencies_s.append(latency)
        else:
            self.errors += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(str(err))

    def check(self, what: str, want: int) -> None:
        if self.errors or self.ok != want:
            raise RuntimeError(
                f"{what}: {self.errors} delivery errors and {self.ok}/{want} successes; "
                f"first errors: {self.first_errors}"
            )


def _produce_n(
    producer: Producer,
    topic: str,
    value: bytes,
    count: int,
    delivery: Delivery,
) -> float:
    """Send ``count`` messages and flush; seconds from the first produce() to flush()'s end."""
    started = time.perf_counter()
    delivery.last_at = started
    produce = producer.produce
    for i in range(count):
        while True:
            try:
                produce(topic, value, on_delivery=delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if remaining:
        raise RuntimeError(f"{remaining} messages still undelivered after {FLUSH_TIMEOUT_S}s")
    return elapsed


class CpuWindow:
    """CPU time of the broker, this process and the whole machine over a timed window."""

    def __init__(self, broker_pid: int) -> None:
        self.broker_pid = broker_pid
        self.broker_s = self.client_s = self.other_s = self.steal_s = 0.0

    def start(self) -> None:
        self._broker = cpu_seconds(self.broker_pid)
        self._client = time.process_time()
        self._machine, self._steal = machine_cpu()

    def stop(self) -> None:
        self.broker_s = cpu_seconds(self.broker_pid) - self._broker
        self.client_s = time.process_time() - self._client
        machine, steal = machine_cpu()
        self.other_s = max(0.0, machine - self._machine - self.broker_s - self.client_s)
        self.steal_s = steal - self._steal


@dataclass
class Throughput:
    messages: int
    seconds: float
    value_bytes: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    broker_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    max_gap_s: float = 0.0
    warmup_messages: int = 0
    other_cpu_s: float = 0.0  # CPU that neither broker nor client used: other processes
    steal_s: float = 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Value bytes per second, 1 MB = 10^6 B."""
        return self.messages * self.value_bytes / self.seconds / 1e6


def _produce_for(
    producer: Producer,
    topic: str,
    value: bytes,
    seconds: float,
    delivery: Delivery,
    *,
    max_bytes: int = WARMUP_MAX_BYTES,
) -> int:
    """Send messages as fast as the client can for ``seconds`` (or until ``max_bytes`` of
    values are sent), then flush; how many."""
    deadline = time.perf_counter() + seconds
    limit = max(1000, max_bytes // max(1, len(value)))
    count = 0
    while count < limit:
        for _ in range(1000):
            try:
                producer.produce(topic, value, on_delivery=delivery)
                count += 1
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if time.perf_counter() >= deadline:
            break
    if producer.flush(FLUSH_TIMEOUT_S):
        raise RuntimeError(f"warm-up messages still undelivered after {FLUSH_TIMEOUT_S}s")
    return count


def produce_throughput(
    bootstrap: str,
    broker_pid: int,
    *,
    topic: str,
    value_bytes: int,
    acks: str,
    messages: int,
    warmup_s: float,
) -> Throughput:
    """Warm up for ``warmup_s`` seconds, then time ``messages`` (one producer, one topic)."""
    value = b"x" * value_bytes
    producer = Producer(producer_config(bootstrap, acks))
    try:
        warm = Delivery(keep_latency=False)
        warmup = _produce_for(producer, topic, value, warmup_s, warm)
        warm.check("warm-up", warmup)
        settle_page_cache()
        delivery = Delivery()
        cpu = CpuWindow(broker_pid)
        with quiet_gc():
            cpu.start()
            seconds = _produce_n(producer, topic, value, messages, delivery)
            cpu.stop()
        delivery.check("timed produce", messages)
    finally:
        producer.close()
    latencies = sorted(delivery.latencies_s)
    return Throughput(
        messages=messages,
        seconds=seconds,
        value_bytes=value_bytes,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        broker_cpu_s=cpu.broker_s,
        client_cpu_s=cpu.client_s,
        other_cpu_s=cpu.other_s,
        steal_s=cpu.steal_s,
        max_gap_s=delivery.max_gap_s,
        warmup_messages=warmup,
    )


def produce_spread(
    bootstrap: str,
    topics: list[str],
    partitions: int,
    value_bytes: int,
    *,
    per_partition: int = 0,
    seconds: float = 0.0,
    max_queued: int = 0,
) -> tuple[int, float]:
    """Messages round-robin over every partition of ``topics`` (acks=1, explicit partitions):
    ``per_partition`` to each, or as many as the client sends in ``seconds``. Returns
    (messages, seconds taken including the final flush). ``max_queued`` (0: the client's own
    limit, 100,000) caps the messages waiting in the client."""
    targets = [(t, p) for t in topics for p in range(partitions)]
    value = b"x" * value_bytes
    producer = Producer(producer_config(bootstrap, "1"))
    delivery = Delivery(keep_latency=False)
    started = time.perf_counter()
    deadline = started + seconds
    limit = per_partition * len(targets)
    sent = 0
    try:
        while (limit and sent < limit) or (not limit and time.perf_counter() < deadline):
            while max_queued and len(producer) > max_queued:
                producer.poll(0.01)
            for _ in range(min(1000, limit - sent) if limit else 1000):
                topic, partition = targets[sent % len(targets)]
                try:
                    producer.produce(topic, value, partition=partition, on_delivery=delivery)
                    sent += 1
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        remaining = producer.flush(FLUSH_TIMEOUT_S)
    finally:
        producer.close()
    if remaining:
        raise RuntimeError(f"{remaining} messages still undelivered after {FLUSH_TIMEOUT_S}s")
    delivery.check("produce to every partition", sent)
    return sent, time.perf_counter() - started


def consume_throughput(
    bootstrap: str,
    broker_pid: int,
    *,
    topic: str,
    partitions: int,
    expected: int,
    value_bytes: int,
    warmup: int,
) -> Throughput:
    """A fresh consumer reads all ``expected`` messages of ``topic``; the part after
    ``warmup`` is timed (from the first consume() call after the warm-up to the last)."""
    settle_page_cache()
    consumer = Consumer(consumer_config(bootstrap))
    got = 0
    try:
        with quiet_gc():
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
            deadline = time.monotonic() + CONSUME_TIMEOUT_S
            started = 0.0
            counted_from = 0
            cpu = CpuWindow(broker_pid)
            while got < expected:
                if not started and got >= warmup:
                    counted_from = got
                    cpu.start()
                    started = time.perf_counter()
                # consume() waits for a full batch or the timeout: never ask for more than is left.
                batch = consumer.consume(num_messages=min(10_000, expected - got), timeout=1.0)
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        raise KafkaException(err)
                got += len(batch)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"consumed {got}/{expected} in {CONSUME_TIMEOUT_S}s")
            seconds = time.perf_counter() - started
            cpu.stop()
    finally:
        consumer.close()
    return Throughput(
        messages=got - counted_from,
        seconds=seconds,
        value_bytes=value_bytes,
        broker_cpu_s=cpu.broker_s,
        client_cpu_s=cpu.client_s,
        other_cpu_s=cpu.other_s,
        steal_s=cpu.steal_s,
    )


@dataclass
class Latency:
    rate: float
    sent: int
    measured: int
    seconds: float
    value_bytes: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    @property
    def msgs_per_s(self) -> float:
        return self.sent / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.msgs_per_s * self.value_bytes / 1e6


def e2e_latency(
    bootstrap: str,
    *,
    topic: str,
    partitions: int,
    value_bytes: int,
    acks: str,
    rate: float,
    seconds: float,
    warmup_s: float,
) -> Latency:
    """Produce at ``rate`` msg/s for ``warmup_s + seconds``; per message, receive time minus
    send time as seen by a consumer thread; percentiles over the messages after the warm-up."""
    if value_bytes < _E2E_HEADER.size:
        raise ValueError(f"e2e values need at least {_E2E_HEADER.size} bytes")
    warm_count = int(rate * warmup_s)
    total = warm_count + int(rate * seconds)
    padding = b"x" * (value_bytes - _E2E_HEADER.size)
    latencies_ns: list[int] = []
    received = 0
    errors: list[str] = []
    done = threading.Event()
    settle_page_cache()
    consumer = Consumer(consumer_config(bootstrap))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])

    def consume() -> None:
        nonlocal received
        try:
            while received < total and not done.is_set():
                msg = consumer.poll(0.1)
                if msg is None:
                    continue
                now = time.perf_counter_ns()
                err = msg.error()
                if err is not None:
                    errors.append(str(err))
                    continue
                value = msg.value()
                assert value is not None
                seq, sent_ns = _E2E_HEADER.unpack_from(value)
                received += 1
                if seq >= warm_count:
                    latencies_ns.append(now - sent_ns)
        except Exception as exc:  # reported by the caller
            errors.append(repr(exc))

    with quiet_gc():
        thread = threading.Thread(target=consume, name="e2e-consumer", daemon=True)
        thread.start()
        producer = Producer(producer_config(bootstrap, acks))
        delivery = Delivery(keep_latency=False)
        try:
            interval_ns = 1e9 / rate
            started_ns = time.perf_counter_ns()
            timed_from_ns = 0
            sent = 0
            while sent < total:
                now_ns = time.perf_counter_ns()
                due = min(total, int((now_ns - started_ns) / interval_ns) + 1)
                while sent < due:
                    if sent == warm_count:
                        timed_from_ns = time.perf_counter_ns()
                    value = _E2E_HEADER.pack(sent, time.perf_counter_ns()) + padding
                    producer.produce(topic, value, on_delivery=delivery)
                    sent += 1
                producer.poll(0)
                next_ns = started_ns + sent * interval_ns
                pause = (next_ns - time.perf_counter_ns()) / 1e9
                if pause > 0:
                    time.sleep(min(pause, 0.001))
            elapsed = (time.perf_counter_ns() - timed_from_ns) / 1e9
            if producer.flush(FLUSH_TIMEOUT_S):
                raise RuntimeError("e2e: messages still undelivered after flush")
            delivery.check("e2e produce", total)
            thread.join(60)
            if thread.is_alive():
                raise TimeoutError(f"e2e: consumer got {received}/{total} after 60 s")
        finally:
            done.set()
            thread.join(10)
            producer.close()
            consumer.close()
    if errors:
        raise RuntimeError(f"e2e consumer errors: {errors[:5]}")
    lat_ms = sorted(ns / 1e6 for ns in latencies_ns)
    return Latency(
        rate=rate,
        sent=total - warm_count,
        measured=len(lat_ms),
        seconds=elapsed,
        value_bytes=value_bytes,
        p50_ms=percentile(lat_ms, 0.50),
        p99_ms=percentile(lat_ms, 0.99),
        p999_ms=percentile(lat_ms, 0.999),
        max_ms=lat_ms[-1] if lat_ms else float("nan"),
        mean_ms=statistics.fmean(lat_ms) if lat_ms else float("nan"),
    )


@dataclass
class Scrape:
    median_ms: float
    max_ms: float
    bytes: int
    series: int
    times_ms: list[float]


def scrape(url: str, count: int) -> Scrape:
    """One untimed GET of ``url``, then ``count`` timed ones (request to body fully read)."""
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - 127.0.0.1 only
        response.read()
    times: list[float] = []
    body = b""
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310
            body = response.read()
        times.append((time.perf_counter() - started) * 1000)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return Scrape(statistics.median(times), max(times), len(body), series, times)


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, read: Callable[[], int], interval: float = 0.1) -> None:
        self.read = read
        self.interval = interval
        self.peak = 0
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.read()
            self.samples.append(value)
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
