"""Hostile clients and unlucky operators: each finding of the hardening work, reproduced.

Run: ``python -m bench.hostile [--quick] [--only NAME[,NAME...]]`` (``make bench-hostile``).
Every repro starts its own ``streambus serve`` of this checkout (a temporary data directory,
127.0.0.1, free ports), does one hostile thing, and prints one line per figure:
``NAME: what happened``. Every loop is bounded in count and time; every broker is killed
and its directory removed afterwards (logs are kept in ``--log-dir``). A repro that finds
the broker refusing (an error code, a closed connection, an exit at start-up) prints that
refusal: it measures what happens, before and after a fix alike, and never asserts.

Sizes are smaller than the findings' own where a full-size run would take minutes or
gigabytes; each line says the size it used. ``--quick`` shrinks them further.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench import stall, wire
from bench.common import ROOT
from bench.otlp import OtlpSink
from bench.streambus_server import StreamBusServer
from bench.workloads import RssSampler

MIB = 2**20
DEFAULT_LOG_DIR = ROOT / "bench" / "results" / "logs" / "hostile"
FUZZ_SEED = 14
INT32_MAX = wire.INT32_MAX
_LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


@dataclass(frozen=True)
class Sizes:
    two_brokers_records: int
    nonreading_clients: int
    nonreading_window_s: float
    fetch_topic_bytes: int
    partial_frames: int
    gzip_inflated: int
    compaction_bytes: int
    wide_partitions: int
    tracing_fetch_bytes: int
    fuzz_frames: int
    idle_wait_s: float


FULL = Sizes(5000, 40, 20.0, 300 * MIB, 20, 10**9, 200 * MIB, 100_000, 20 * MIB, 5000, 8.0)
QUICK = Sizes(2000, 10, 8.0, 60 * MIB, 5, 250 * 10**6, 40 * MIB, 20_000, 10 * MIB, 1000, 5.0)


@dataclass
class Ctx:
    sizes: Sizes
    parent: Path
    log_dir: Path
    sink: OtlpSink
    name: str = ""


def say(text: str) -> None:
    print(text, flush=True)


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def broker(ctx: Ctx, mode: str = "off", label: str = "", **kw: Any) -> Iterator[StreamBusServer]:
    """A started broker in a fresh temporary directory; killed afterwards, its log kept."""
    with tempfile.TemporaryDirectory(prefix=f"hostile-{ctx.name}-", dir=ctx.parent) as tmp:
        server = StreamBusServer(Path(tmp), mode, ctx.sink if mode == "tracing" else None, **kw)
        try:
            server.start()
            yield server
        finally:
            server.kill()
            server.keep_log(ctx.log_dir / f"{ctx.name}{label}.log")


def try_start(server: StreamBusServer, timeout: float = 20) -> str | None:
    """Start ``server``; None if it listens, else how it failed (exit code, last log line)."""
    try:
        server.start(timeout)
    except (RuntimeError, TimeoutError) as exc:
        lines = [line for line in server.log_text().splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if not line.startswith(" ")), "")
        last = _LOG_STAMP.sub("", last)
        code = None if server.proc is None else server.proc.poll()
        return f"{type(exc).__name__} (exit {code}): {last[:200] or str(exc)[:160]}"
    return None


def consume_all(
    bootstrap: str, topic: str, *, deadline_s: float = 15, idle_s: float = 3
) -> tuple[dict[int, bytes], int, list[str]]:
    """Everything a consumer gets from partition 0 of ``topic`` from the start, until
    ``idle_s`` without a message or ``deadline_s``: {offset: value}, repeated offsets,
    the first errors."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "hostile-reader",
            "enable.auto.commit": False,
            "check.crcs": True,
            "fetch.error.backoff.ms": 100,
        }
    )
    got: dict[int, bytes] = {}
    repeated = 0
    errors: list[str] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + deadline_s
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                text = str(err.str())[:90]
                if len(errors) < 3 and text not in errors:
                    errors.append(text)
                continue
            last = time.monotonic()
            offset = msg.offset() or 0
            if offset in got:
                repeated += 1
            got[offset] = msg.value() or b""
    finally:
        consumer.close()
    return got, repeated, errors


def produce_acked(bootstrap: str, topic: str, values: Sequence[bytes]) -> dict[int, bytes]:
    """Produce ``values`` (acks=all) to partition 0; {acknowledged offset: value}."""
    acked: dict[int, bytes] = {}

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            acked[msg.offset()] = msg.value()

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    try:
        for value in values:
            producer.produce(topic, value, partition=0, on_delivery=report)
        producer.flush(60)
    finally:
        producer.close()
    return acked


def answers(bootstrap: str, timeout: float = 5) -> bool:
    """Does the broker answer an ApiVersions on a new connection within ``timeout``?"""
    try:
        with wire.RawClient(bootstrap, timeout=timeout) as client:
            client.send(wire.api_versions_frame())
            return len(client.read_frame()) > 0
    except (OSError, ConnectionError):
        return False


def fd_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return -1


def raw_codes(response: Any) -> str:
    """Error codes (and messages) of an admin response's per-topic results."""
    items = getattr(response, "topics", None) or getattr(response, "responses", None) or []
    out = []
    for item in items:
        message = getattr(item, "error_message", None)
        out.append(f"{item.error_code}" + (f" ({message})" if message else ""))
    return ", ".join(out) or "none"


# --------------------------------------------------------------------------- data loss, bricking


def two_brokers(ctx: Ctx) -> list[str]:
    n = ctx.sizes.two_brokers_records
    with tempfile.TemporaryDirectory(prefix="hostile-two-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        data = work / "data"
        servers = [StreamBusServer(work, "off", data_dir=data, log_name=f"{x}.log") for x in "abc"]
        a, b, c = servers
        try:
            a.start()
            stall.create_topic(a.bootstrap, "shared", 1)
            failed = try_start(b, 15)
            second = "no: " + failed if failed else "yes, both listening"
            acked_a: dict[int, bytes] = {}
            acked_b = 0
            chunk = 500
            for start in range(0, n, chunk):
                values = [f"a-{i:06d}".encode() for i in range(start, min(n, start + chunk))]
                acked_a.update(produce_acked(a.bootstrap, "shared", values))
                if not failed:
                    other = [f"b-{i:06d}".encode() for i in range(start, min(n, start + chunk))]
                    acked_b += len(produce_acked(b.bootstrap, "shared", other))
            a.stop()
            if not failed:
                b.stop()
            restart = try_start(c)
            if restart:
                return [f"two-brokers: second broker started: {second}; restart failed: {restart}"]
            got, repeated, errors = consume_all(c.bootstrap, "shared")
            lost = sum(1 for off, value in acked_a.items() if got.get(off) != value)
            c.stop()
        finally:
            for s in servers:
                s.kill()
                s.keep_log(ctx.log_dir / f"two-brokers-{s.log_path.stem}.log")
    return [
        f"two-brokers: second broker on the same data dir started: {second}",
        f"two-brokers: first broker acknowledged {len(acked_a):,}/{n:,}, second {acked_b:,}; "
        f"after a restart {lost:,} of the first's acknowledged records are lost or changed, "
        f"{repeated} offsets repeat, {len(got):,} records read"
        + (f"; consumer errors {errors}" if errors else ""),
    ]


def create_7000(ctx: Ctx) -> list[str]:
    from kafka.protocol.admin import CreateTopicsRequest  # noqa: PLC0415

    nofile = 4096
    with tempfile.TemporaryDirectory(prefix="hostile-fds-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        first = StreamBusServer(work, "off", nofile=nofile, log_name="first.log")
        again = StreamBusServer(
            work, "off", data_dir=first.data_dir, nofile=nofile, log_name="restart.log"
        )
        try:
            first.start()
            fds_before = fd_count(first.pid)
            request = CreateTopicsRequest(
                topics=[
                    CreateTopicsRequest.CreatableTopic(
                        name="wide",
                        num_partitions=7000,
                        replication_factor=1,
                        assignments=[],
                        configs=[],
                    )
                ],
                timeout_ms=60_000,
                validate_only=False,
            )
            started = time.monotonic()
            try:
                with wire.RawClient(first.bootstrap, timeout=120) as client:
                    answer = raw_codes(client.request(request, 5))
            except (OSError, ConnectionError) as exc:
                answer = f"no answer ({type(exc).__name__})"
            took = time.monotonic() - started
            fds_after = fd_count(first.pid)
            dirs = len(list((first.data_dir / "topics" / "wide").glob("[0-9]*")))
            first.stop()
            restart = try_start(again)
            if restart is None:
                again.stop()
        finally:
            first.kill()
            again.kill()
            first.keep_log(ctx.log_dir / "create-7000-first.log")
            again.keep_log(ctx.log_dir / "create-7000-restart.log")
    return [
        f"create-7000: CreateTopics of 7,000 partitions with RLIMIT_NOFILE {nofile}: code "
        f"{answer} after {took:.1f} s; broker fds {fds_before} -> {fds_after}, "
        f"{dirs:,} partition dirs left",
        "create-7000: broker restarts on that data dir: "
        + ("yes" if restart is None else f"no: {restart}"),
    ]


def _committed(bootstrap: str, group: str, topic: str) -> str:
    """The offset ``group`` has committed for partition 0 of ``topic``, as a client sees it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tp = consumer.committed([TopicPartition(topic, 0)], timeout=10)[0]
        return str(tp.offset if tp.error is None else tp.error)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        consumer.close()


def internal_topic(ctx: Ctx) -> list[str]:
    from kafka.protocol.admin import DeleteTopicsRequest  # noqa: PLC0415

    junk = wire.simple_batch([(b"junk-key", b"junk-value")])
    with tempfile.TemporaryDirectory(prefix="hostile-internal-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        servers = [
            StreamBusServer(work, "off", data_dir=work / "data", log_name=f"{i}.log")
            for i in range(3)
        ]
        try:
            first, second, third = servers
            first.start()
            stall.create_topic(first.bootstrap, "t", 1)
            committer = Consumer({"bootstrap.servers": first.bootstrap, "group.id": "victim"})
            try:
                committer.commit(offsets=[TopicPartition("t", 0, 100)], asynchronous=False)
            finally:
                committer.close()
            before = _committed(first.bootstrap, "victim", "t")
            with wire.RawClient(first.bootstrap) as client:
                produce = client.request(
                    wire.produce_request("__consumer_offsets", ((p, junk) for p in range(10))), 9
                )
            codes = sorted({p.error_code for t in produce.responses for p in t.partition_responses})
            first.stop()
            restart = try_start(second)
            after_produce = restart or _committed(second.bootstrap, "victim", "t")
            if restart is None:
                with wire.RawClient(second.bootstrap) as client:
                    delete = raw_codes(
                        client.request(
                            DeleteTopicsRequest(
                                topic_names=["__consumer_offsets"], timeout_ms=30_000
                            ),
                            5,
                        )
                    )
                second.stop()
                restart = try_start(third)
                after_delete = restart or _committed(third.bootstrap, "victim", "t")
            else:
                delete = after_delete = "not tried"
        finally:
            for s in servers:
                s.kill()
                s.keep_log(ctx.log_dir / f"internal-topic-{s.log_path.stem}.log")
    return [
        f"internal-topic: Produce of a junk record into each of __consumer_offsets' 10 "
        f"partitions: codes {codes}; group 'victim' committed offset {before}, after a restart "
        f"{after_produce}",
        f"internal-topic: DeleteTopics __consumer_offsets: code {delete}; committed offset "
        f"after a restart {after_delete}",
    ]


def corrupt_metadata(ctx: Ctx) -> list[str]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="hostile-meta-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        first = StreamBusServer(work, "off", log_name="first.log")
        again = StreamBusServer(work, "off", data_dir=first.data_dir, log_name="restart.log")
        try:
            first.start()
            stall.create_topic(first.bootstrap, "t", 1)
            produce_acked(first.bootstrap, "t", [b"kept"] * 10)
            first.stop()
            (first.data_dir / "topics" / "t" / "topic.json").write_bytes(b'{"name": "t", "par')
            failed = try_start(again)
            if failed:
                lines.append(f"corrupt-topic-json: broker starts: no: {failed}")
            else:
                meta = AdminClient({"bootstrap.servers": again.bootstrap}).list_topics(timeout=10)
                listed = "t" in meta.topics and meta.topics["t"].error is None
                recreate = stall.create_topic(again.bootstrap, "t", 1) or "ok (created)"
                lines.append(
                    f"corrupt-topic-json: broker starts: yes; topic listed: {listed}; "
                    f"recreating it: {recreate}; tracebacks in log {again.tracebacks()}"
                )
                again.stop()
        finally:
            first.kill()
            again.kill()
            again.keep_log(ctx.log_dir / "corrupt-topic-json.log")
    with tempfile.TemporaryDirectory(prefix="hostile-meta-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        first = StreamBusServer(work, "off", log_name="first.log")
        again = StreamBusServer(work, "off", data_dir=first.data_dir, log_name="restart.log")
        try:
            first.start()
            first.stop()
            (first.data_dir / "meta.properties").write_bytes(b"\xff\xfe\x00cluster.id\n\x81=")
            failed = try_start(again)
            lines.append(
                "corrupt-meta-properties: broker starts: "
                + ("yes" if failed is None else f"no: {failed}")
                + f"; tracebacks in log {again.tracebacks()}"
            )
        finally:
            first.kill()
            again.kill()
            again.keep_log(ctx.log_dir / "corrupt-meta-properties.log")
    return lines


# --------------------------------------------------------------------------- memory


def nonreading_fetch(ctx: Ctx) -> list[str]:
    s = ctx.sizes
    fetch_bytes = 50 * MIB  # librdkafka's fetch.max.bytes default (52428800)
    lines = []
    for mode in ("off", "tracing"):
        with broker(ctx, mode, label=f"-{mode}") as server:
            stall.create_topic(server.bootstrap, "big", 1)
            stall.fill_topic(
                server.bootstrap, "big", s.fetch_topic_bytes, batch_bytes=stall.FETCH_BATCH_BYTES
            )
            frame = wire.encode(wire.fetch_request([("big", [0])], max_bytes=fetch_bytes), 12)
            rss_before = server.rss_bytes()
            clients: list[wire.RawClient] = []
            refused = 0
            with RssSampler(server.rss_bytes) as rss, stall.probing(server.bootstrap) as probe:
                try:
                    for _ in range(s.nonreading_clients):
                        try:
                            client = wire.RawClient(server.bootstrap, timeout=5, rcvbuf=4096)
                            clients.append(client)
                            for _ in range(3):
                                client.send(frame)
                        except OSError:  # a broker that limits connections or memory
                            refused += 1
                    time.sleep(s.nonreading_window_s)
                finally:
                    for client in clients:
                        client.close()
        n = len(clients)
        lines.append(
            f"nonreading-fetch (tracing {'on' if mode == 'tracing' else 'off'}): {n} clients x 3 "
            f"Fetches of {mib(fetch_bytes)} on a {mib(s.fetch_topic_bytes)} topic, never read, "
            f"for {s.nonreading_window_s:.0f} s: broker RSS {mib(rss_before)} -> peak "
            f"{mib(rss.peak)} ({(rss.peak - rss_before) / max(1, n) / MIB:,.0f} MiB per "
            f"connection; {refused} refused or cut off); max event-loop stall "
            f"{probe.max_ms:,.0f} ms ({probe.samples} probes"
            + (f"; {probe.error}" if probe.error else "")
            + (
                "; a lower bound: a probe was still waiting when the window closed"
                if probe.max_s >= s.nonreading_window_s - 1
                else ""
            )
            + ")"
        )
    return lines


def huge_fetch(ctx: Ctx) -> list[str]:
    size = ctx.sizes.fetch_topic_bytes
    with broker(ctx, "off") as server:
        stall.create_topic(server.bootstrap, "big", 1)
        stall.fill_topic(server.bootstrap, "big", size, batch_bytes=stall.FETCH_BATCH_BYTES)
        result = stall.fetch_stall(
            server,
            "big",
            INT32_MAX,
            f"huge-fetch: one Fetch with max_bytes 2^31-1 on a {mib(size)} topic (tracing off)",
            timeout=180,
        )
    return [result.line()]


def partial_frames(ctx: Ctx) -> list[str]:
    count = ctx.sizes.partial_frames
    frame_size, sent_size = 100_000_000, 95_000_000
    with broker(ctx, "off") as server:
        rss_before = server.rss_bytes()
        socks: list[socket.socket] = []
        cut = stuck = 0
        block = bytes(4 * MIB)
        # A broker that stops reading (a memory budget) leaves sendall blocked: each
        # connection gets 5 s without progress, the whole repro 90 s.
        deadline = time.monotonic() + 90
        try:
            with RssSampler(server.rss_bytes) as rss:
                for _ in range(count):
                    if time.monotonic() > deadline:
                        break
                    try:
                        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                        socks.append(sock)
                        sock.sendall(struct.pack(">i", frame_size))
                        left = sent_size
                        while left and time.monotonic() < deadline:
                            n = min(left, len(block))
                            sock.sendall(block[:n])
                            left -= n
                    except TimeoutError:
                        stuck += 1
                    except OSError:
                        cut += 1
                time.sleep(2)
            held = server.rss_bytes()
        finally:
            for sock in socks:
                sock.close()
    return [
        f"partial-frames: {len(socks)} connections each sending {sent_size / 1e6:.0f} MB of a "
        f"{frame_size / 1e6:.0f} MB frame: broker RSS {mib(rss_before)} -> peak {mib(rss.peak)}, "
        f"{mib(held)} held; {cut} connections cut off while sending, {stuck} left unread "
        "(the broker stopped reading them for 5 s)"
    ]


def gzip_bomb(ctx: Ctx) -> list[str]:
    inflated = ctx.sizes.gzip_inflated
    bomb = wire.gzip_bomb(inflated)
    with broker(ctx, "off") as server:
        stall.create_topic(server.bootstrap, "bomb", 1)
        rss_before = server.rss_bytes()
        with (
            RssSampler(server.rss_bytes, 0.05) as rss,
            wire.RawClient(server.bootstrap, timeout=120) as client,
        ):
            started = time.monotonic()
            try:
                response = client.request(wire.produce_request("bomb", [(0, bomb)]), 9)
                part = response.responses[0].partition_responses[0]
                answer = f"code {part.error_code}"
            except (OSError, ConnectionError) as exc:
                answer = f"no answer ({type(exc).__name__})"
            took = time.monotonic() - started
        alive = answers(server.bootstrap)
    return [
        f"gzip-bomb: {len(bomb) / 1e3:,.0f} kB gzip batch inflating to {inflated / 1e6:,.0f} MB: "
        f"{answer} after {took:.1f} s; broker RSS {mib(rss_before)} -> peak {mib(rss.peak)}; "
        f"broker alive after: {alive}"
    ]


# --------------------------------------------------------------------------- stalls


def stall_compaction(ctx: Ctx) -> list[str]:
    size = ctx.sizes.compaction_bytes
    result = stall.compaction_stall(
        ctx.parent,
        size,
        f"stall-compaction: compaction of a {mib(size)} topic",
        keep_log=ctx.log_dir / "stall-compaction.log",
    )
    return [result.line()]


def stall_wide(ctx: Ctx) -> list[str]:
    n = ctx.sizes.wide_partitions
    exist = 1000
    with broker(ctx, "tracing") as server:
        stall.create_topic(server.bootstrap, "wide", exist)
        lines = []
        for kind in ("produce", "fetch"):
            result = stall.wide_request_stall(
                server,
                "wide",
                n,
                kind=kind,
                name=f"stall-wide-{kind}: one {kind.capitalize()} naming {n:,} partitions "
                f"of a topic with {exist:,} (tracing on)",
                timeout=180,
            )
            lines.append(result.line())
        lines.append(f"stall-wide: broker log lines {len(server.log_text().splitlines()):,}")
    return lines


def stall_tracing_fetch(ctx: Ctx) -> list[str]:
    size = ctx.sizes.tracing_fetch_bytes
    lines = []
    for mode in ("tracing", "off"):
        with broker(ctx, mode, label=f"-{mode}") as server:
            stall.create_topic(server.bootstrap, "fetched", 1)
            stall.fill_topic(
                server.bootstrap, "fetched", size + size // 10, batch_bytes=stall.FETCH_BATCH_BYTES
            )
            result = stall.fetch_stall(
                server,
                "fetched",
                size,
                f"stall-tracing-fetch: a {mib(size)} fetch, tracing "
                + ("on" if mode == "tracing" else "off"),
            )
        lines.append(result.line())
    return lines


# --------------------------------------------------------------------------- connections


def idle_timeout(ctx: Ctx) -> list[str]:
    wait = ctx.sizes.idle_wait_s
    env = {"STREAMBUS_CONNECTIONS_MAX_IDLE_MS": "2000"}
    with broker(ctx, "off", env=env) as server, wire.RawClient(server.bootstrap) as client:
        started = time.monotonic()
        closed = client.closed_by_peer(wait)
        took = time.monotonic() - started
    outcome = f"closed after {took:.1f} s" if closed else f"still open after {wait:.0f} s"
    return [
        "idle-timeout: a connection that sends nothing "
        f"(STREAMBUS_CONNECTIONS_MAX_IDLE_MS=2000): {outcome}"
    ]


def abandoned_long_poll(ctx: Ctx) -> list[str]:
    with broker(ctx, "metrics") as server:
        stall.create_topic(server.bootstrap, "empty", 1)
        frame = wire.encode(
            wire.fetch_request([("empty", [0])], max_wait_ms=INT32_MAX, min_bytes=1), 12
        )
        metric = "active_requests"
        with wire.RawClient(server.bootstrap) as client:
            client.send(frame)
            time.sleep(1.0)
            during = server.metric_sum(metric)
        deadline = time.monotonic() + 5
        after = server.metric_sum(metric)
        while after and time.monotonic() < deadline:
            time.sleep(0.2)
            after = server.metric_sum(metric)
    return [
        f"abandoned-long-poll: Fetch with max_wait_ms 2^31-1, client closes: active requests "
        f"{during} while waiting, {after} 5 s after the close"
    ]


def sigterm_long_poll(ctx: Ctx) -> list[str]:
    frame = wire.encode(wire.fetch_request([], max_wait_ms=INT32_MAX, min_bytes=1), 12)
    with broker(ctx, "off") as server, wire.RawClient(server.bootstrap) as client:
        client.send(frame)
        time.sleep(0.5)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = server.proc.wait(45)
        except Exception:
            code = "still running after 45 s (killed)"
        took = time.monotonic() - started
        cancelled = server.log_text().count("CancelledError")
        tracebacks = server.tracebacks()
    return [
        f"sigterm-long-poll: SIGTERM with a long-poll Fetch of an empty topic list waiting: "
        f"exit {code} after {took:.1f} s; {tracebacks} tracebacks, {cancelled} CancelledError "
        "mentions in the log"
    ]


# --------------------------------------------------------------------------- malformed input


def _fuzz_bases() -> list[tuple[Any, int]]:
    """One valid request of every served API, at the newest version served."""
    from kafka.protocol import admin, consumer, metadata  # noqa: PLC0415

    J = consumer.JoinGroupRequest
    C = admin.CreateTopicsRequest
    one = wire.simple_batch([(b"k", b"v")])
    return [
        (metadata.ApiVersionsRequest(client_software_name="fuzz", client_software_version="1"), 3),
        (metadata.MetadataRequest(topics=None, allow_auto_topic_creation=False), 9),
        (wire.produce_request("fuzz", [(0, one)], acks=1), 9),
        (wire.fetch_request([("fuzz", [0])], max_bytes=1 << 16), 12),
        (consumer.ListOffsetsRequest(replica_id=-1, isolation_level=0, topics=[]), 6),
        (metadata.FindCoordinatorRequest(key="g", key_type=0), 3),
        (
            J(
                group_id="g",
                session_timeout_ms=10_000,
                rebalance_timeout_ms=10_000,
                member_id="",
                protocol_type="consumer",
                protocols=[J.JoinGroupRequestProtocol(name="range", metadata=b"\x00")],
            ),
            6,
        ),
        (consumer.SyncGroupRequest(group_id="g", generation_id=1, member_id="m"), 4),
        (consumer.HeartbeatRequest(group_id="g", generation_id=1, member_id="m"), 4),
        (consumer.LeaveGroupRequest(group_id="g", members=[]), 4),
        (consumer.OffsetCommitRequest(group_id="g", generation_id_or_member_epoch=-1), 8),
        (consumer.OffsetFetchRequest(group_id="g", topics=None), 7),
        (admin.ListGroupsRequest(), 4),
        (admin.DescribeGroupsRequest(groups=["g"]), 5),
        (admin.DeleteGroupsRequest(groups_names=["nobody"]), 2),
        (
            C(
                topics=[
                    C.CreatableTopic(
                        name="fuzz-new",
                        num_partitions=1,
                        replication_factor=1,
                        assignments=[],
                        configs=[],
                    )
                ],
                timeout_ms=1000,
                validate_only=True,
            ),
            5,
        ),
        (admin.DeleteTopicsRequest(topic_names=["nobody"], timeout_ms=1000), 5),
    ]


def _mutate(body: bytes, rng: random.Random) -> bytes:
    """A damaged copy of a request body; the 8-byte prefix (API, version, correlation id)
    is kept so every frame reaches its API's decoder."""
    data = bytearray(body)
    prefix = 8
    if len(data) <= prefix + 1:
        return bytes(data)
    kind = rng.randrange(5)
    pos = rng.randrange(prefix, len(data))
    if kind == 0:  # a few random bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(prefix, len(data))] = rng.randrange(256)
    elif kind == 1:  # compact length 0: a null array, string or bytes
        data[pos] = 0
    elif kind == 2:  # a huge or negative length
        data[pos] = 0xFF
    elif kind == 3:  # cut short
        del data[pos:]
    else:  # stray bytes inserted
        data[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def fuzz(ctx: Ctx) -> list[str]:
    n = ctx.sizes.fuzz_frames
    rng = random.Random(FUZZ_SEED)
    env = {"STREAMBUS_AUTO_CREATE_TOPICS_ENABLE": "false"}
    bases = [(wire.encode(req, v, 7, "fuzz")[4:], req) for req, v in _fuzz_bases()]
    answered = closed = silent = 0
    with broker(ctx, "off", env=env) as server:
        stall.create_topic(server.bootstrap, "fuzz", 1)
        before = server.tracebacks()
        client: wire.RawClient | None = None
        deadline = time.monotonic() + 300
        sent = 0
        try:
            for sent in range(1, n + 1):  # noqa: B007 - the count is reported
                if time.monotonic() > deadline:
                    break
                body = _mutate(rng.choice(bases)[0], rng)
                try:
                    if client is None:
                        client = wire.RawClient(server.bootstrap, timeout=0.2)
                    client.send(wire.FRAME_SIZE.pack(len(body)) + body)
                    client.read_frame()
                    answered += 1
                except TimeoutError:
                    silent += 1
                    if client is not None:
                        client.close()
                    client = None
                except (OSError, ConnectionError):
                    closed += 1
                    if client is not None:
                        client.close()
                    client = None
        finally:
            if client is not None:
                client.close()
        alive = answers(server.bootstrap)
        tracebacks = server.tracebacks() - before
    return [
        f"fuzz: {sent:,} mutated frames of {len(bases)} APIs (seed {FUZZ_SEED}): "
        f"{tracebacks} tracebacks in the broker log; {answered:,} answered, {closed:,} "
        f"connections closed, {silent:,} unanswered in 0.2 s; broker alive: {alive}"
    ]


def long_strings(ctx: Ctx) -> list[str]:
    from kafka.protocol import admin, consumer  # noqa: PLC0415

    J = consumer.JoinGroupRequest
    join = J(
        group_id="g" * 40_000,
        session_timeout_ms=10_000,
        rebalance_timeout_ms=10_000,
        member_id="",
        protocol_type="consumer",
        protocols=[J.JoinGroupRequestProtocol(name="range", metadata=b"\x00")],
    )
    with broker(ctx, "off") as server:
        outcome = []
        with wire.RawClient(server.bootstrap, timeout=10) as client:
            try:
                response = client.request(join, 6)
                outcome.append(f"JoinGroup code {response.error_code}")
            except (OSError, ConnectionError) as exc:
                outcome.append(f"JoinGroup: no answer ({type(exc).__name__})")
        with wire.RawClient(server.bootstrap, timeout=10) as client:
            try:
                groups = client.request(admin.ListGroupsRequest(), 2)
                outcome.append(f"ListGroups v2 code {groups.error_code}")
            except (OSError, ConnectionError) as exc:
                outcome.append(f"ListGroups v2: no answer ({type(exc).__name__})")
        tracebacks = server.tracebacks()
    return [
        f"long-strings: 40,000-character group id: {'; '.join(outcome)}; {tracebacks} tracebacks"
    ]


# --------------------------------------------------------------------------- corruption


def _segments(partition_dir: Path) -> list[Path]:
    return sorted(partition_dir.glob("*.log"))


def _damaged_base(case: str, partition_dir: Path) -> int:
    """The base offset of the segment ``_damage`` changes for ``case``."""
    segs = _segments(partition_dir)
    if case == "zeroed-last":
        return int(segs[-1].stem)
    return int((segs[1] if len(segs) > 2 else segs[0]).stem)


def _damage(case: str, partition_dir: Path) -> str:
    segs = _segments(partition_dir)
    closed = segs[1] if len(segs) > 2 else segs[0]
    if case == "flipped-byte":
        data = bytearray(closed.read_bytes())
        data[len(data) // 2] ^= 0xFF
        closed.write_bytes(bytes(data))
        return f"byte {len(data) // 2} of {closed.name} flipped"
    if case == "truncated":
        size = closed.stat().st_size
        os.truncate(closed, size // 2)
        return f"{closed.name} cut from {size} to {size // 2} bytes"
    if case == "zero-length":
        os.truncate(closed, 0)
        return f"{closed.name} emptied"
    if case == "base-offset":
        data = bytearray(closed.read_bytes())
        (base,) = struct.unpack_from(">q", data, 0)
        struct.pack_into(">q", data, 0, base + 1000)
        closed.write_bytes(bytes(data))
        return f"first batch of {closed.name} moved from offset {base} to {base + 1000}"
    last = segs[-1]
    last.write_bytes(bytes(last.stat().st_size))
    return f"last segment {last.name} zeroed"


def _raw_fetch(bootstrap: str, topic: str, offset: int) -> str:
    """What one Fetch from ``offset`` answers: a closed connection, or its code and how many
    of the served batches pass their CRC-32C."""
    try:
        with wire.RawClient(bootstrap, timeout=10) as client:
            response = client.request(
                wire.fetch_request([(topic, [0])], max_bytes=4 * MIB, offset=offset), 12
            )
    except (OSError, ConnectionError) as exc:
        return f"connection closed ({type(exc).__name__})"
    part = response.responses[0].partitions[0]
    data = bytes(part.records or b"")
    good = bad = 0
    pos = 0
    while pos + 61 <= len(data):
        (length,) = struct.unpack_from(">i", data, pos + 8)
        end = pos + 12 + length
        if length < 49 or end > len(data):
            break  # a partial batch at the end: what max_bytes cut, or what is left of one
        (crc,) = struct.unpack_from(">I", data, pos + 17)
        if crc32c.crc32c(data[pos + 21 : end]) == crc:
            good += 1
        else:
            bad += 1
        pos = end
    return (
        f"code {part.error_code}, {len(data):,} bytes, {good} batches with a good CRC, "
        f"{bad} with a bad one"
    )


CORRUPTION_CASES = ("flipped-byte", "truncated", "zero-length", "base-offset", "zeroed-last")


def corruption(ctx: Ctx) -> list[str]:
    n = 4000
    values = [f"{i:08d}".encode() + b"." * 1000 for i in range(n)]
    lines = []
    with tempfile.TemporaryDirectory(prefix="hostile-corrupt-", dir=ctx.parent) as tmp:
        work = Path(tmp)
        seed = StreamBusServer(work, "off", log_name="seed.log")
        try:
            seed.start()
            config = {"segment.bytes": str(MIB)}
            stall.create_topic(seed.bootstrap, "c", 1, config)
            acked = produce_acked(seed.bootstrap, "c", values)
            seed.stop()
        finally:
            seed.kill()
        for case in CORRUPTION_CASES:
            data = work / f"data-{case}"
            shutil.copytree(seed.data_dir, data)
            base = _damaged_base(case, data / "topics" / "c" / "0")
            what = _damage(case, data / "topics" / "c" / "0")
            server = StreamBusServer(work, "metrics", data_dir=data, log_name=f"{case}.log")
            try:
                failed = try_start(server)
                if failed:
                    lines.append(f"corruption {case}: {what}; broker starts: no: {failed}")
                    continue
                raw = _raw_fetch(server.bootstrap, "c", base)
                got, repeated, errors = consume_all(server.bootstrap, "c", deadline_s=12)
                wrong = sum(1 for off, v in got.items() if not v.startswith(f"{off:08d}".encode()))
                missing = sum(1 for off in acked if off not in got)
                extra = ""
                if case == "zeroed-last":
                    new = produce_acked(server.bootstrap, "c", [b"after-restart"])
                    extra = f"; next produced offset {min(new) if new else 'none'} (had {n:,})"
                counted = server.metric_sum("corrupt")
                tracebacks = server.tracebacks()
                server.stop()
            finally:
                server.kill()
                server.keep_log(ctx.log_dir / f"corruption-{case}.log")
            lines.append(
                f"corruption {case}: {what}; a Fetch from offset {base}: {raw}; "
                f"a consumer got {len(got):,}/{len(acked):,} "
                f"({missing:,} missing, {wrong:,} under a wrong offset, {repeated} repeated)"
                + (f", errors {errors}" if errors else "")
                + f"{extra}; corruption metric: "
                + ("none" if counted is None else f"{counted:g}")
                + f"; {tracebacks} tracebacks"
            )
    return lines


# --------------------------------------------------------------------------- main

REPROS: dict[str, Callable[[Ctx], list[str]]] = {
    "two-brokers": two_brokers,
    "create-7000": create_7000,
    "internal-topic": internal_topic,
    "corrupt-metadata": corrupt_metadata,
    "nonreading-fetch": nonreading_fetch,
    "huge-fetch": huge_fetch,
    "partial-frames": partial_frames,
    "gzip-bomb": gzip_bomb,
    "stall-compaction": stall_compaction,
    "stall-wide": stall_wide,
    "stall-tracing-fetch": stall_tracing_fetch,
    "idle-timeout": idle_timeout,
    "abandoned-long-poll": abandoned_long_poll,
    "sigterm-long-poll": sigterm_long_poll,
    "fuzz": fuzz,
    "long-strings": long_strings,
    "corruption": corruption,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter waits")
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME[,NAME]",
        help="run only these repros: " + ", ".join(REPROS),
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(REPROS)
    unknown = [n for n in names if n not in REPROS]
    if unknown:
        raise SystemExit(f"unknown repro(s) {unknown}; choose from {', '.join(REPROS)}")
    sizes = QUICK if args.quick else FULL
    args.log_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"StreamBus hostile repros ({'quick' if args.quick else 'full'}), "
        f"commit {_commit()}, {os.cpu_count()} CPUs"
    )
    failures = 0
    started = time.monotonic()
    with OtlpSink() as sink:
        for name in names:
            ctx = Ctx(sizes, args.work_dir.resolve(), args.log_dir, sink, name)
            t0 = time.monotonic()
            try:
                lines = REPROS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failures += 1
                lines = [f"{name}: REPRO FAILED: {type(exc).__name__}: {exc}"]
                traceback.print_exc(file=sys.stderr)
            for line in lines:
                say(line)
            say(f"  ({name}: {time.monotonic() - t0:.1f} s)")
    say(f"done in {time.monotonic() - started:.0f} s; broker logs in {args.log_dir}")
    return 1 if failures else 0


def _commit() -> str:
    from bench.common import machine_info  # noqa: PLC0415

    return str(machine_info()["streambus_commit"])


if __name__ == "__main__":
    sys.exit(main())
