"""Event-loop stalls: how long the broker's loop stops answering while it does one big thing.

StreamBus serves every connection from one asyncio loop, so work that holds the loop holds
every client: heartbeats, fetches, /metrics. :class:`StallProbe` measures it from outside:
a connection of its own sends ApiVersions v0 (the cheapest request) every 10 ms and keeps
the longest round trip. A probe request still unanswered when the probe stops counts with
the time it has waited so far. The probe is a thread of the bench process; every scenario
builds its request bytes before the probe starts, so the client's own CPU work does not
show up as broker latency.

Scenarios, each given a running broker (or, for compaction, a parent directory):

* :func:`fetch_stall`: one Fetch of ``max_bytes`` from offset 0 of a filled topic, read by
  the client as fast as it can; also time to first byte and the broker's peak RSS.
* :func:`compaction_stall`: a compacted topic filled with keyed records while the broker's
  maintenance interval is an hour, then the broker restarted with a 2 s interval; the
  probe runs from the restart until the partition has shrunk to half and then stayed the
  same size for 2 s (compaction done; the 2 s are in the scenario's time).
* :func:`wide_request_stall`: one Produce or Fetch naming many partitions of one topic.

``python -m bench.stall`` runs the three of the benchmark on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench import wire
from bench.common import rss_bytes
from bench.otlp import OtlpSink
from bench.streambus_server import StreamBusServer
from bench.workloads import RssSampler

GOAL_STALL_MS = 50.0
PROBE_INTERVAL_S = 0.010
MIB = 2**20
COMPACT_SEGMENT_BYTES = 16 * MIB
COMPACT_KEYS = 2000
# Topics that are fetched are written in the Java client's default batch.size: a fetch's
# cost per batch (trace-header scans, CRC checks) then shows as it does for most producers.
FETCH_BATCH_BYTES = 16384
HOUR_MS = 3_600_000


class StallProbe:
    """A connection that sends ApiVersions every ``interval`` and keeps the longest RTT."""

    def __init__(self, bootstrap: str, interval: float = PROBE_INTERVAL_S) -> None:
        host, port = bootstrap.rsplit(":", 1)
        self.address = (host, int(port))
        self.interval = interval
        self.max_s = 0.0
        self.samples = 0
        self.error: str | None = None
        self._sent_at = 0.0  # perf_counter of the request in flight; 0 when none
        self._stop = threading.Event()
        self._sock = socket.create_connection(self.address, timeout=5)
        self._sock.settimeout(None)  # a stall may last minutes; stop() closes the socket
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)

    def _round_trip(self, correlation_id: int) -> None:
        self._sent_at = time.perf_counter()
        self._sock.sendall(wire.api_versions_frame(correlation_id))
        need = 4
        head = b""
        while len(head) < need:
            chunk = self._sock.recv(need - len(head))
            if not chunk:
                raise ConnectionError("broker closed the probe connection")
            head += chunk
        left = int.from_bytes(head, "big")
        while left:
            chunk = self._sock.recv(min(left, 65536))
            if not chunk:
                raise ConnectionError("broker closed the probe connection")
            left -= len(chunk)
        rtt = time.perf_counter() - self._sent_at
        self._sent_at = 0.0
        self.max_s = max(self.max_s, rtt)
        self.samples += 1

    def _run(self) -> None:
        correlation_id = 0
        next_at = time.perf_counter()
        while not self._stop.is_set():
            correlation_id += 1
            try:
                self._round_trip(correlation_id)
            except OSError as exc:
                if not self._stop.is_set():
                    self.error = f"{type(exc).__name__}: {exc}"
                return
            next_at += self.interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                self._stop.wait(pause)
            else:
                next_at = time.perf_counter()

    def start(self) -> StallProbe:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop probing; the longest stall in seconds, counting a request still waiting."""
        waiting = self._sent_at
        if waiting:
            self.max_s = max(self.max_s, time.perf_counter() - waiting)
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._sock.close()
        return self.max_s

    @property
    def max_ms(self) -> float:
        return self.max_s * 1000

    def __enter__(self) -> StallProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def probing(bootstrap: str) -> Iterator[StallProbe]:
    probe = StallProbe(bootstrap).start()
    try:
        yield probe
    finally:
        probe.stop()


@dataclass
class Stall:
    """What one scenario measured."""

    name: str
    max_stall_ms: float
    seconds: float  # of the scenario's own work (request to response, or to compaction)
    samples: int
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def line(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.detail.items())
        text = f"{self.name}: max stall {self.max_stall_ms:,.0f} ms over {self.seconds:.1f} s"
        text += f" ({self.samples} probes)"
        if extra:
            text += f"; {extra}"
        if self.error:
            text += f"; {self.error}"
        return text


def create_topic(
    bootstrap: str, topic: str, partitions: int, config: Mapping[str, str] | None = None
) -> str | None:
    """CreateTopics through the admin client; None on success, else the error's name."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    future = admin.create_topics(
        [NewTopic(topic, partitions, 1, config=dict(config or {}))], operation_timeout=120
    )[topic]
    try:
        future.result(timeout=180)
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        return str(err.name())
    return None


def fill_topic(
    bootstrap: str,
    topic: str,
    total_bytes: int,
    *,
    value_bytes: int = 1024,
    keys: int = 0,
    partitions: int = 1,
    batch_bytes: int = 1_000_000,
    timeout: float = 300,
) -> int:
    """Produce about ``total_bytes`` of values (``keys`` distinct keys, or none) round-robin
    over the partitions (acks=1) in batches of up to ``batch_bytes``; how many messages.
    Every delivery is checked."""
    count = max(1, total_bytes // value_bytes)
    value = b"v" * value_bytes
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "acks": "1",
            "batch.size": batch_bytes,
            "message.max.bytes": 1_000_000,
        }
    )
    failed: list[str] = []

    def report(err: KafkaError | None, _msg: Any) -> None:
        if err is not None and len(failed) < 5:
            failed.append(str(err))

    deadline = time.monotonic() + timeout
    try:
        _fill(
            producer,
            topic,
            count,
            value=value,
            keys=keys,
            partitions=partitions,
            report=report,
            deadline=deadline,
        )
        if producer.flush(timeout):
            raise TimeoutError(f"filling {topic}: messages undelivered after {timeout:.0f}s")
    finally:
        producer.close()
    if failed:
        raise RuntimeError(f"filling {topic}: delivery errors {failed}")
    return count


def _fill(
    producer: Producer,
    topic: str,
    count: int,
    *,
    value: bytes,
    keys: int,
    partitions: int,
    report: Any,
    deadline: float,
) -> None:
    for i in range(count):
        key = f"k{i % keys:06d}".encode() if keys else None
        while True:
            try:
                producer.produce(topic, value, key, partition=i % partitions, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError(f"filling {topic}: {i}/{count} before the deadline")
        if i % 1000 == 0:
            producer.poll(0)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (files vanishing meanwhile count 0)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def fetch_stall(
    server: StreamBusServer, topic: str, max_bytes: int, name: str, timeout: float = 120
) -> Stall:
    """One Fetch of up to ``max_bytes`` (partition 0 from offset 0), read whole by a client."""
    frame = wire.encode(wire.fetch_request([(topic, [0])], max_bytes=max_bytes), 12)
    detail: dict[str, Any] = {}
    error = None
    with wire.RawClient(server.bootstrap, timeout=timeout) as client:
        rss_before = server.rss_bytes()
        with RssSampler(server.rss_bytes) as rss, probing(server.bootstrap) as probe:
            started = time.perf_counter()
            client.send(frame)
            try:
                size = client.read_frame_size()
                detail["response"] = f"{size / MIB:,.1f} MiB"
                detail["first byte"] = f"{client.first_byte_at - started:.2f} s"
            except (OSError, ConnectionError) as exc:
                error = f"no full response: {type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - started
    detail["broker RSS"] = f"{rss_before / MIB:,.0f} -> peak {rss.peak / MIB:,.0f} MiB"
    return Stall(name, probe.max_ms, seconds, probe.samples, detail, error or probe.error)


def wide_request_stall(
    server: StreamBusServer,
    topic: str,
    entries: int,
    *,
    kind: str,
    name: str,
    timeout: float = 120,
) -> Stall:
    """One Produce (a one-record batch each) or Fetch naming partitions 0..entries-1 of
    ``topic``; entries beyond the topic's partitions are answered per partition."""
    if kind == "produce":
        one = wire.simple_batch([(None, b"x" * 10)])
        request = wire.produce_request(topic, ((p, one) for p in range(entries)), acks=1)
        version = 9
    else:
        request = wire.fetch_request([(topic, range(entries))], max_bytes=1 << 20)
        version = 12
    frame = wire.encode(request, version)
    detail: dict[str, Any] = {"request": f"{len(frame) / MIB:.1f} MiB"}
    error = None
    with (
        wire.RawClient(server.bootstrap, timeout=timeout) as client,
        probing(server.bootstrap) as probe,
    ):
        started = time.perf_counter()
        client.send(frame)
        try:
            body = client.read_frame()
            seconds = time.perf_counter() - started
            response = wire.response_class(request).decode(body, version=version, header=True)
            detail["answers"] = _partition_codes(response, kind)
        except (OSError, ConnectionError) as exc:
            seconds = time.perf_counter() - started
            error = f"no response: {type(exc).__name__}: {exc}"
        except Exception as exc:  # a response the decoder rejects: report, don't crash
            seconds = time.perf_counter() - started
            error = f"undecodable response: {type(exc).__name__}: {exc}"
    return Stall(name, probe.max_ms, seconds, probe.samples, detail, error or probe.error)


def _partition_codes(response: Any, kind: str) -> str:
    codes: Counter[int] = Counter()
    if kind == "produce":
        for topic in response.responses:
            codes.update(p.error_code for p in topic.partition_responses)
    else:
        if response.error_code:
            codes[response.error_code] += 1
        for topic in response.responses:
            codes.update(p.error_code for p in topic.partitions)
    return " ".join(f"code {c} x{n:,}" for c, n in sorted(codes.items())) or "none"


def _wait_compacted(data_dir: Path, before: int, timeout: float, settle: float = 2.0) -> None:
    """Until the data has shrunk to half and then not changed for ``settle`` seconds:
    compaction swaps segments one at a time, so half way is not the end of it."""
    deadline = time.monotonic() + timeout
    size, changed = before, time.monotonic()
    while time.monotonic() < deadline:
        now = dir_bytes(data_dir)
        if now != size:
            size, changed = now, time.monotonic()
        elif size <= before / 2 and time.monotonic() - changed >= settle:
            return
        time.sleep(0.1)


def compaction_stall(
    parent: Path, total_bytes: int, name: str, timeout: float = 180, keep_log: Path | None = None
) -> Stall:
    """Fill a compacted topic while nothing compacts, restart with a 2 s maintenance
    interval, and probe until the partition has shrunk to half and settled (or ``timeout``)."""
    with tempfile.TemporaryDirectory(prefix="bench-compaction-", dir=parent) as tmp:
        work = Path(tmp)
        topic = "compacted"
        config = {"cleanup.policy": "compact", "segment.bytes": str(COMPACT_SEGMENT_BYTES)}
        filler = StreamBusServer(
            work,
            "off",
            env={"STREAMBUS_MAINTENANCE_INTERVAL_MS": str(HOUR_MS)},
            log_name="fill.log",
        )
        try:
            filler.start()
            problem = create_topic(filler.bootstrap, topic, 1, config)
            if problem is not None:
                raise RuntimeError(f"CreateTopics {topic}: {problem}")
            fill_topic(filler.bootstrap, topic, total_bytes, keys=COMPACT_KEYS)
            filler.stop()
        finally:
            filler.kill()
        before = dir_bytes(filler.data_dir)
        server = StreamBusServer(
            work,
            "off",
            data_dir=filler.data_dir,
            env={"STREAMBUS_MAINTENANCE_INTERVAL_MS": "2000"},
            log_name="compact.log",
        )
        try:
            server.start()
            with probing(server.bootstrap) as probe:
                started = time.perf_counter()
                _wait_compacted(server.data_dir, before, timeout)
                seconds = time.perf_counter() - started
            after = dir_bytes(server.data_dir)
            detail = {
                "data": f"{before / MIB:,.0f} -> {after / MIB:,.0f} MiB",
                "broker RSS": f"{rss_bytes(server.pid) / MIB:,.0f} MiB",
            }
            error = None if after <= before / 2 else f"not compacted after {timeout:.0f} s"
            server.stop()
        finally:
            server.kill()
            server.keep_log(keep_log)
    return Stall(name, probe.max_ms, seconds, probe.samples, detail, error or probe.error)


@dataclass(frozen=True)
class StallPlan:
    compaction_bytes: int
    fetch_bytes: int
    produce_partitions: int  # partition entries in the wide Produce
    topic_partitions: int  # partitions that exist in the topic it names


BENCH_FULL = StallPlan(200 * MIB, 50 * MIB, 10_000, 1000)
BENCH_QUICK = StallPlan(40 * MIB, 20 * MIB, 2_000, 200)


def bench_stalls(plan: StallPlan, parent: Path, log_dir: Path | None = None) -> list[Stall]:
    """The benchmark's three: compaction, a fetch with tracing on, a wide Produce."""
    out = [
        compaction_stall(
            parent,
            plan.compaction_bytes,
            f"compaction of a {plan.compaction_bytes / MIB:.0f} MiB topic",
            keep_log=None if log_dir is None else log_dir / "streambus-stall-compaction.log",
        )
    ]
    with OtlpSink() as sink, tempfile.TemporaryDirectory(prefix="bench-stall-", dir=parent) as tmp:
        server = StreamBusServer(Path(tmp), "tracing", sink)
        try:
            server.start()
            if problem := create_topic(server.bootstrap, "fetched", 1):
                raise RuntimeError(f"CreateTopics fetched: {problem}")
            fill_topic(
                server.bootstrap,
                "fetched",
                plan.fetch_bytes + plan.fetch_bytes // 10,
                batch_bytes=FETCH_BATCH_BYTES,
            )
            out.append(
                fetch_stall(
                    server,
                    "fetched",
                    plan.fetch_bytes,
                    f"a {plan.fetch_bytes / MIB:.0f} MiB fetch, tracing on",
                )
            )
            if problem := create_topic(server.bootstrap, "wide", plan.topic_partitions):
                raise RuntimeError(f"CreateTopics wide: {problem}")
            out.append(
                wide_request_stall(
                    server,
                    "wide",
                    plan.produce_partitions,
                    kind="produce",
                    name=f"a Produce to {plan.produce_partitions:,} partitions "
                    f"({plan.topic_partitions:,} exist), tracing on",
                )
            )
            server.stop()
        finally:
            server.kill()
            if log_dir is not None:
                server.keep_log(log_dir / "streambus-stall-tracing.log")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stall", description="event-loop stalls of the benchmark"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    for stall in bench_stalls(BENCH_QUICK if args.quick else BENCH_FULL, args.work_dir):
        goal = "met" if stall.max_stall_ms < GOAL_STALL_MS and not stall.error else "NOT met"
        print(f"[{goal:^7}] {stall.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
