"""Replicated produce: three StreamBus brokers beside three Apache Kafka brokers (KRaft).

Each system runs as a three-node cluster on 127.0.0.1 (StreamBus: three ``streambus serve``
processes, each a Raft voter, /metrics on, tracing off; Kafka: ``bench.kafka_cluster``, three
combined broker+controller JVMs). On each, topics with replication factor 3 and
``min.insync.replicas=2`` are created with the admin client and the bench waits until every
partition lists three replicas, all in sync. Then, with the same confluent-kafka client and
settings on both systems:

* **Throughput**: one producer, ``acks=all``, ``linger.ms=5``, no key, a 3-partition topic per
  value size (100 B and 1 KiB): a warm-up, then a timed count of messages; messages/s and MB/s
  (value bytes, 1 MB = 10^6 B) from the first ``produce()`` to ``flush()`` returning, and the
  client's delivery latency p50/p99 (librdkafka's ``produce()`` -> acknowledgement) of the
  timed messages (``bench.workloads.produce_throughput``).
* **Replication latency**, measured the same way for both systems from the client: one
  message at a time (``linger.ms=0``, each flushed before the next, so no batching or
  queueing), 100 B values, to a 1-partition topic, alternating blocks of ``acks=1`` and
  ``acks=all`` requests on two producers. Each request's acknowledgement latency is
  librdkafka's delivery latency. The replication latency reported is the ``acks=all`` quantile
  minus the ``acks=1`` quantile (p50 and p99): the time the leader holds an ``acks=all``
  answer until its followers have the batch, with the network round trip and the leader's own
  append taken out. Both raw distributions are reported too.
* **StreamBus's own figure**: ``streambus_replication_latency_seconds`` (the leader's append
  of a batch -> the high watermark covering it, one observation per batch), its buckets summed
  over the three brokers' /metrics from a real scrape after the latency run, p50/p99 estimated
  as Prometheus's ``histogram_quantile`` does (linear within a bucket). Kafka has no such
  metric; its row says so.

When StreamBus refuses replication factor 3 (a build without replication), its rows are
skipped with the broker's answer. Results go to ``bench/results/replication.json``; goals are
not asserted.

    .venv/bin/python -m bench.replication [--quick] [--no-kafka] [--no-streambus]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ROOT, free_port, machine_info, run_and_report, wait_for_port
from bench.kafka import ensure_kafka
from bench.kafka_cluster import KafkaCluster, running_kafka_cluster
from bench.streambus_server import StreamBusServer
from bench.workloads import percentile, produce_throughput, settle_page_cache

DEFAULT_OUT = ROOT / "bench" / "results" / "replication.json"
DEFAULT_LOG_DIR = ROOT / "bench" / "results" / "logs" / "replication"
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2
THROUGHPUT_PARTITIONS = 3
VALUE_SIZES = (100, 1024)
LATENCY_VALUE_BYTES = 100
LATENCY_BLOCK = 100  # requests per acks setting before switching to the other
READY_TIMEOUT_S = 90.0
CREATE_TIMEOUT_S = 120.0
REPLICATION_METRIC = "streambus_replication_latency_seconds"
SLOW_BATCH_S = 0.1  # a bucket bound of the latency histograms: batches above it are counted


@dataclass(frozen=True)
class Plan:
    name: str
    produce_messages: dict[int, int]
    warmup_s: float
    latency_samples: int  # per acks setting


FULL = Plan("full", {100: 300_000, 1024: 100_000}, 2.0, 2000)
QUICK = Plan("quick", {100: 50_000, 1024: 20_000}, 0.5, 400)


class ReplicationRefusedError(Exception):
    """The system would not create a topic with replication factor 3."""


@dataclass
class Row:
    system: str
    workload: str
    value_bytes: int
    msgs_per_s: float | None = None
    mb_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""


@dataclass
class Result:
    plan: str
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# -- the StreamBus cluster --------------------------------------------------------------------


class StreamBusCluster:
    """Three ``streambus serve`` processes forming one cluster (each a Raft voter), /metrics
    on and tracing off, data and logs under ``work_dir``; every one dies with the bench."""

    def __init__(self, work_dir: Path, size: int = 3) -> None:
        raft_ports = {node: free_port() for node in range(1, size + 1)}
        quorum = ",".join(f"{n}@127.0.0.1:{p}" for n, p in raft_ports.items())
        secret = secrets.token_hex(16)
        self.nodes: dict[int, StreamBusServer] = {}
        for node in raft_ports:
            server = StreamBusServer(
                work_dir,
                "metrics",
                data_dir=work_dir / f"node-{node}",
                env={"STREAMBUS_CLUSTER_SECRET": secret},
                log_name=f"streambus-node-{node}.log",
            )
            server.cmd += [
                "--node-id",
                str(node),
                "--controller-quorum",
                quorum,
                "--advertised-host",
                "127.0.0.1",
            ]
            self.nodes[node] = server
        self.start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes.values())

    def start(self) -> None:
        started = time.monotonic()
        # All at once: no broker finishes starting before a majority of voters runs.
        for server in self.nodes.values():
            server.launch(server.cmd, ROOT, server.env)
        for server in self.nodes.values():
            assert server.proc is not None
            wait_for_port(server.port, server.proc, READY_TIMEOUT_S, "streambus", server.log_path)
        wait_brokers(self.bootstrap_list(), len(self.nodes), time.monotonic() + READY_TIMEOUT_S)
        self.start_seconds = time.monotonic() - started

    def bootstrap_list(self) -> list[str]:
        return [n.bootstrap for n in self.nodes.values()]

    def stop(self) -> None:
        for server in self.nodes.values():
            if server.proc is not None:
                server.stop()

    def kill(self) -> None:
        for server in self.nodes.values():
            server.kill()

    def keep_logs(self, keep_dir: Path | None) -> None:
        if keep_dir is not None:
            for node, server in self.nodes.items():
                server.keep_log(keep_dir / f"streambus-node-{node}.log")

    def metrics_urls(self) -> list[str]:
        return [u for u in (n.metrics_url for n in self.nodes.values()) if u is not None]


@contextlib.contextmanager
def running_streambus_cluster(
    parent: Path | None = None, keep_logs: Path | None = None
) -> Iterator[StreamBusCluster]:
    with tempfile.TemporaryDirectory(prefix="bench-streambus-cluster-", dir=parent) as tmp:
        cluster = StreamBusCluster(Path(tmp))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.kill()
            cluster.keep_logs(keep_logs)


def wait_brokers(bootstraps: list[str], size: int, deadline: float) -> None:
    """Until the metadata of every broker lists ``size`` brokers."""
    admins = [AdminClient({"bootstrap.servers": b}) for b in bootstraps]
    while True:
        seen: list[int] = []
        for admin in admins:
            with contextlib.suppress(Exception):
                seen.append(len(admin.list_topics(timeout=2).brokers))
        if seen == [size] * len(admins):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"brokers not all registered in time (each sees {seen})")
        time.sleep(0.2)


# -- topics -----------------------------------------------------------------------------------


def create_replicated_topic(bootstrap: str, topic: str, partitions: int) -> float:
    """Create ``topic`` with replication factor 3 and min.insync.replicas 2; wait until every
    partition has a leader and three in-sync replicas. Seconds it took. Raises
    :class:`ReplicationRefusedError` with the broker's answer when it refuses the factor."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    started = time.monotonic()
    deadline = started + CREATE_TIMEOUT_S
    new = NewTopic(
        topic,
        partitions,
        REPLICATION_FACTOR,
        config={"min.insync.replicas": str(MIN_INSYNC_REPLICAS)},
    )
    while True:
        try:
            admin.create_topics([new], operation_timeout=60)[topic].result(CREATE_TIMEOUT_S)
            break
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                break
            if err.code() == KafkaError.INVALID_REPLICATION_FACTOR:
                # Kafka answers this until all three brokers registered; a build of StreamBus
                # without replication answers it for good.
                if time.monotonic() > started + 20:
                    raise ReplicationRefusedError(f"{err.name()}: {err.str()}") from None
            elif not err.retriable() or time.monotonic() > deadline:
                raise
        time.sleep(0.5)
    while True:
        meta = admin.list_topics(topic, timeout=30).topics.get(topic)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(
                p.leader >= 0
                and len(p.replicas) == REPLICATION_FACTOR
                and len(p.isrs) == REPLICATION_FACTOR
                for p in meta.partitions.values()
            )
        ):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: partitions not fully replicated in time: {meta}")
        time.sleep(0.2)


# -- workloads --------------------------------------------------------------------------------


def sequential_latencies(
    producers: dict[str, Producer], topic: str, samples: int, value: bytes
) -> dict[str, list[float]]:
    """Per-request acknowledgement latency (seconds), one message in flight at a time,
    alternating blocks of LATENCY_BLOCK between the producers (keyed by their acks)."""
    out: dict[str, list[float]] = {acks: [] for acks in producers}
    errors: list[str] = []

    def record(acks: str) -> Any:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(f"acks={acks}: {err}")
                return
            latency = msg.latency()
            if latency is not None:
                out[acks].append(latency)

        return delivered

    callbacks = {acks: record(acks) for acks in producers}
    # A short warm-up per producer: connections, metadata, the first segment writes.
    for producer in producers.values():
        for _ in range(20):
            producer.produce(topic, value, partition=0)
            producer.flush(30)
    done = 0
    while done < samples:
        block = min(LATENCY_BLOCK, samples - done)
        for acks, producer in producers.items():
            for _ in range(block):
                producer.produce(topic, value, partition=0, on_delivery=callbacks[acks])
                if producer.flush(30):
                    raise RuntimeError(f"acks={acks}: a message undelivered after 30 s")
        done += block
    if errors:
        raise RuntimeError(f"{len(errors)} delivery errors; first: {errors[:3]}")
    return out


def scrape_histogram(urls: list[str], name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of histogram ``name`` summed over the
    /metrics of ``urls`` and over series whose labels include ``labels``."""
    buckets: dict[float, float] = {}
    want = set(labels.items())
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our broker
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name != f"{name}_bucket":
                    continue
                sample_labels = dict(sample.labels)
                bound = float(sample_labels.pop("le"))
                if want <= set(sample_labels.items()):
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets: linear within the bucket that
    holds the rank; the highest finite bound when the rank falls in +Inf; None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# -- one system -------------------------------------------------------------------------------


def measure(
    system: str,
    bootstrap: str,
    pid: int,
    plan: Plan,
    result: Result,
    *,
    metrics_urls: list[str] | None = None,
) -> None:
    """Every workload on one started cluster; rows appended to ``result``."""
    prefix = f"repl-{secrets.token_hex(3)}"
    for size in VALUE_SIZES:
        topic = f"{prefix}-{size}"
        took = create_replicated_topic(bootstrap, topic, THROUGHPUT_PARTITIONS)
        print(f"  {system}: {topic} (RF 3, min ISR 2) in sync after {took:.1f}s", flush=True)
        settle_page_cache()
        run = produce_throughput(
            bootstrap,
            pid,
            topic=topic,
            value_bytes=size,
            acks="all",
            messages=plan.produce_messages[size],
            warmup_s=plan.warmup_s,
        )
        row = Row(
            system,
            "produce acks=all",
            size,
            run.msgs_per_s,
            run.mb_per_s,
            run.p50_ms,
            run.p99_ms,
            note="p50/p99: client delivery latency",
        )
        result.rows.append(row)
        print(f"  {format_row(row)}", flush=True)

    topic = f"{prefix}-latency"
    first_latency_row = len(result.rows)
    create_replicated_topic(bootstrap, topic, 1)
    value = b"x" * LATENCY_VALUE_BYTES
    producers = {
        acks: Producer(
            {"bootstrap.servers": bootstrap, "acks": acks, "linger.ms": 0, "batch.num.messages": 1}
        )
        for acks in ("1", "all")
    }
    try:
        latencies = sequential_latencies(producers, topic, plan.latency_samples, value)
    finally:
        for producer in producers.values():
            producer.flush(10)
    quantiles: dict[str, tuple[float, float]] = {}
    for acks, values in latencies.items():
        values.sort()
        quantiles[acks] = (percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000)
        result.rows.append(
            Row(
                system,
                f"request ack latency acks={acks}",
                LATENCY_VALUE_BYTES,
                p50_ms=quantiles[acks][0],
                p99_ms=quantiles[acks][1],
                note=f"{len(values)} sequential requests, one message each",
            )
        )
    result.rows.append(
        Row(
            system,
            "replication latency (acks=all - acks=1)",
            LATENCY_VALUE_BYTES,
            p50_ms=quantiles["all"][0] - quantiles["1"][0],
            p99_ms=quantiles["all"][1] - quantiles["1"][1],
            note="difference of the two quantiles above",
        )
    )
    if metrics_urls is not None:
        buckets = scrape_histogram(metrics_urls, REPLICATION_METRIC, topic=topic)
        count = buckets.get(float("inf"), 0.0)
        if count:
            p50 = histogram_quantile(0.5, buckets)
            p99 = histogram_quantile(0.99, buckets)
            result.rows.append(
                Row(
                    system,
                    f"{REPLICATION_METRIC} (scrape)",
                    LATENCY_VALUE_BYTES,
                    p50_ms=None if p50 is None else p50 * 1000,
                    p99_ms=None if p99 is None else p99 * 1000,
                    note=(
                        f"{count:.0f} observations on {topic}, summed over the brokers; "
                        f"{count - buckets.get(SLOW_BATCH_S, 0.0):.0f} above "
                        f"{SLOW_BATCH_S * 1000:.0f} ms"
                    ),
                )
            )
        else:
            result.rows.append(
                Row(
                    system,
                    f"{REPLICATION_METRIC} (scrape)",
                    LATENCY_VALUE_BYTES,
                    note=f"no observations for topic {topic} on any broker's /metrics",
                )
            )
    for row in result.rows[first_latency_row:]:
        print(f"  {format_row(row)}", flush=True)


def run_kafka(plan: Plan, result: Result, work_dir: Path | None, log_dir: Path) -> None:
    home = ensure_kafka()
    with running_kafka_cluster(home, work_dir, log_dir) as cluster:
        print(f"kafka {home.version}: 3 nodes ready in {cluster.start_seconds:.1f}s", flush=True)
        measure_cluster("kafka", cluster, plan, result)
        cluster.stop()


def measure_cluster(system: str, cluster: KafkaCluster, plan: Plan, result: Result) -> None:
    measure(system, cluster.bootstrap, cluster.pids()[0], plan, result)


def run_streambus(plan: Plan, result: Result, work_dir: Path | None, log_dir: Path) -> None:
    with running_streambus_cluster(work_dir, log_dir) as cluster:
        print(f"streambus: 3 nodes ready in {cluster.start_seconds:.1f}s", flush=True)
        try:
            measure(
                "streambus",
                cluster.bootstrap,
                cluster.nodes[1].pid,
                plan,
                result,
                metrics_urls=cluster.metrics_urls(),
            )
        except ReplicationRefusedError as exc:
            reason = f"replication factor 3 refused by the cluster ({exc})"
            result.skipped["streambus"] = reason
            print(f"  streambus: SKIPPED: {reason}", flush=True)
        cluster.stop()


# -- output -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_row(row: Row) -> str:
    rate = "" if row.msgs_per_s is None else f"{row.msgs_per_s:>10,.0f} msg/s "
    mb = "" if row.mb_per_s is None else f"{row.mb_per_s:7.1f} MB/s "
    return (
        f"{row.system:<10} {row.workload:<44} {row.value_bytes:>5} B  {rate}{mb}"
        f"p50 {_ms(row.p50_ms)} ms  p99 {_ms(row.p99_ms)} ms  ({row.note})"
    )


def render(result: Result) -> str:
    lines = [
        f"replication benchmark ({result.plan}): replication factor 3, min.insync.replicas 2, "
        "three brokers per system on 127.0.0.1",
        "replication latency = per-request acknowledgement latency with acks=all minus with "
        "acks=1 (client-side, sequential requests)",
        "",
    ]
    lines += [format_row(r) for r in result.rows]
    for system, reason in result.skipped.items():
        lines.append(f"{system:<10} SKIPPED: {reason}")
    if result.rows:
        by_system: dict[str, list[float]] = {}
        for r in result.rows:
            if r.workload == "produce acks=all" and r.msgs_per_s:
                by_system.setdefault(r.system, []).append(r.msgs_per_s)
        if len(by_system) == 2:
            ratios = [
                s / k for s, k in zip(by_system["streambus"], by_system["kafka"], strict=False)
            ]
            lines.append(
                "streambus/kafka acks=all throughput ratio: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f" (mean {statistics.mean(ratios):.2f})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts")
    parser.add_argument("--no-kafka", action="store_true", help="StreamBus only")
    parser.add_argument("--no-streambus", action="store_true", help="Kafka only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work-dir", type=Path, help="parent of the clusters' data directories")
    parser.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    result = Result(plan.name, machine_info())
    runs = []
    if not args.no_streambus:
        runs.append(("streambus", run_streambus))
    if not args.no_kafka:
        runs.append(("kafka", run_kafka))
    return run_and_report(
        [
            (system, functools.partial(run, plan, result, args.work_dir, args.log_dir))
            for system, run in runs
        ],
        result,
        render,
        args.out,
        args.log_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
