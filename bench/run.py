"""The StreamBus benchmark harness: StreamBus against Apache Kafka, plus StreamBus's own
telemetry overhead, /metrics scrape cost and memory.

Run: ``python -m bench.run [--quick] [--out bench/results/latest.json]`` (``make bench``,
``make bench-quick``). It prints a table and writes the results as JSON.

1. Comparison, in A B A B order (StreamBus, Kafka, StreamBus, Kafka, ...; ``--rounds``): each
   turn starts a fresh broker, creates 3-partition topics and runs, with the same
   confluent-kafka client and settings on both: produce throughput (100 B and 1 KiB values x
   acks=1 and acks=all, ``linger.ms=5``), consume throughput of the acks=1 data just produced,
   and end-to-end latency at a fixed rate (acks=1 and acks=all). StreamBus runs with
   /metrics on and no tracing (``metrics`` mode); Kafka is ``bench.kafka``'s single KRaft node.
2. Telemetry overhead: StreamBus alone, a fresh broker per run, modes ``off``, ``metrics`` and
   ``tracing`` (100 % sampling, spans exported over OTLP to a sink in this process)
   interleaved over rounds; produce throughput with 100 B values, acks=1.
3. Scrape: one StreamBus broker with /metrics, topics of 10 partitions added until 10, 100 and
   1000 partitions exist, a message produced to every partition, then timed GETs of /metrics.
4. Memory: a fresh broker of each system, 1000 partitions created; RSS idle, then sampled
   during a produce run across all of them.
5. Event-loop stalls (``bench.stall``): the longest a probe connection waits for an
   ApiVersions answer while StreamBus compacts a 200 MiB topic, serves a 50 MiB fetch with
   tracing on, and takes a Produce naming 10,000 partitions.

Beside throughput, every produce and consume run reports the broker's own CPU time per
message (utime + stime of the broker process from /proc, before and after the timed window).

Goals are reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import stall, workloads
from bench.common import ROOT, loadavg, machine_info
from bench.kafka import KafkaHome, KafkaServer, ensure_kafka, java_version, running_kafka
from bench.otlp import OtlpSink
from bench.streambus_server import StreamBusServer, running_streambus

DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"
DEFAULT_LOG_DIR = ROOT / "bench" / "results" / "logs"
PARTITIONS = 3
VALUE_SIZES = (100, 1024)
ACKS = ("1", "all")
E2E_VALUE_BYTES = 100
COMPARISON_MODE = "metrics"  # StreamBus's telemetry mode in the comparison with Kafka
TELEMETRY_MODES = ("off", "metrics", "tracing")
SCRAPE_TOPIC_PARTITIONS = 10
MIB = 2**20

# The goals of the issue, reported and never asserted.
GOAL_THROUGHPUT_RATIO = 0.5
GOAL_METRICS_PCT = 5.0
GOAL_TRACING_PCT = 15.0
GOAL_SCRAPE_MS = 100.0
GOAL_IDLE_RSS_MIB = 150.0
GOAL_STALL_MS = stall.GOAL_STALL_MS


@dataclass(frozen=True)
class Plan:
    """Sizes of one harness run."""

    name: str
    rounds: int
    produce_messages: dict[int, int]  # timed messages, by value size
    produce_warmup_s: float
    consume_warmup: int
    e2e_rate: float
    e2e_seconds: float
    e2e_warmup_s: float
    telemetry_rounds: int
    telemetry_messages: int
    telemetry_warmup_s: float
    scrape_count: int
    memory_load_s: float
    kafka_memory: bool  # also measure Kafka's RSS (a fresh node with 1000 partitions)
    scrape_partitions: tuple[int, ...] = (10, 100, 1000)
    memory_partitions: int = 1000
    stalls: stall.StallPlan = stall.BENCH_FULL


FULL = Plan(
    name="full",
    rounds=3,
    produce_messages={100: 1_000_000, 1024: 300_000},
    produce_warmup_s=2.0,
    consume_warmup=10_000,
    e2e_rate=5000,
    e2e_seconds=10,
    e2e_warmup_s=2,
    telemetry_rounds=3,
    telemetry_messages=1_000_000,
    telemetry_warmup_s=1.0,
    scrape_count=20,
    memory_load_s=10,
    kafka_memory=True,
)
QUICK = Plan(
    name="quick",
    rounds=2,
    produce_messages={100: 200_000, 1024: 50_000},
    produce_warmup_s=0.5,
    consume_warmup=5_000,
    e2e_rate=2000,
    e2e_seconds=2,
    e2e_warmup_s=0.5,
    telemetry_rounds=3,
    telemetry_messages=300_000,
    telemetry_warmup_s=0.3,
    scrape_count=5,
    memory_load_s=3,
    # Kafka drains 1000 partitions slowly (about 20 s for the client's queue): full run only.
    kafka_memory=False,
    stalls=stall.BENCH_QUICK,
)


@dataclass
class Sample:
    """One measurement of one round."""

    system: str
    workload: str
    value_bytes: int
    acks: str
    round: int
    msgs_per_s: float
    mb_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """Everything one harness run measured, and what went wrong."""

    comparison: list[Sample] = field(default_factory=list)
    telemetry: list[Sample] = field(default_factory=list)
    scrape: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    kafka_start_s: list[float] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)


def _r(value: float | None, digits: int = 3) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- brokers


@contextlib.contextmanager
def broker(
    system: str,
    kafka: KafkaHome | None,
    outcome: Outcome,
    label: str,
    args: argparse.Namespace,
    *,
    mode: str = COMPARISON_MODE,
    sink: OtlpSink | None = None,
) -> Iterator[StreamBusServer | KafkaServer]:
    """A fresh broker of ``system``; stopped with SIGTERM afterwards, its log kept and
    scanned for WARNING/ERROR lines, a non-zero exit recorded as an error."""
    keep = None if args.log_dir is None else args.log_dir / f"{label}.log"
    server: StreamBusServer | KafkaServer
    if system == "kafka":
        assert kafka is not None
        cm: contextlib.AbstractContextManager[StreamBusServer | KafkaServer] = running_kafka(
            kafka, args.work_dir, keep
        )
    else:
        cm = running_streambus(mode, sink, args.work_dir, keep)
    with cm as server:
        if isinstance(server, KafkaServer):
            outcome.kafka_start_s.append(server.start_seconds)
        try:
            yield server
            code = server.stop()
        finally:
            outcome.log_problems += [f"[{label}] {line}" for line in server.problem_lines()]
    if code != 0:
        raise RuntimeError(f"{label}: broker exited {code} after SIGTERM")


def _cpu_pct(cpu_s: float, seconds: float) -> float | None:
    return _r(cpu_s / seconds * 100, 1) if seconds > 0 else None


def _us_per_msg(t: workloads.Throughput) -> float | None:
    """The broker's own CPU time (utime + stime from /proc) per message of the window, in µs."""
    return _r(t.broker_cpu_s / t.messages * 1e6) if t.messages else None


def _cpu_extra(t: workloads.Throughput) -> dict[str, float | None]:
    """CPU shares in the timed window, in percent of one core: the broker, the bench client,
    and everything else on the machine (other_cpu_pct: the noise of a shared machine)."""
    return {
        "broker_cpu_pct": _cpu_pct(t.broker_cpu_s, t.seconds),
        "client_cpu_pct": _cpu_pct(t.client_cpu_s, t.seconds),
        "other_cpu_pct": _cpu_pct(t.other_cpu_s, t.seconds),
        "steal_cpu_pct": _cpu_pct(t.steal_s, t.seconds),
    }


# --------------------------------------------------------------------------- workloads


def comparison_turn(
    server: StreamBusServer | KafkaServer, round_no: int, plan: Plan, samples: list[Sample]
) -> None:
    """Produce, consume and e2e-latency runs against one broker.

    Each produce topic is deleted once it has been read (acks=1) or right after its run
    (acks=all), so the page cache holds one topic's data at a time (see
    ``workloads.WARMUP_MAX_BYTES`` for why that matters on this VM).
    """
    system = server.system
    boot = server.bootstrap
    produce_topics = {(vb, acks): f"produce-{vb}-{acks}" for vb in VALUE_SIZES for acks in ACKS}
    e2e_topics = {acks: f"e2e-{acks}" for acks in ACKS}
    workloads.create_topics(boot, [*produce_topics.values(), *e2e_topics.values()], PARTITIONS)
    for vb in VALUE_SIZES:
        for acks in ACKS:
            topic = produce_topics[(vb, acks)]
            t = workloads.produce_throughput(
                boot,
                server.pid,
                topic=topic,
                value_bytes=vb,
                acks=acks,
                messages=plan.produce_messages[vb],
                warmup_s=plan.produce_warmup_s,
            )
            samples.append(
                Sample(
                    system,
                    "produce",
                    vb,
                    acks,
                    round_no,
                    t.msgs_per_s,
                    t.mb_per_s,
                    t.p50_ms,
                    t.p99_ms,
                    {
                        "messages": t.messages,
                        "warmup_messages": t.warmup_messages,
                        "seconds": _r(t.seconds),
                        **_cpu_extra(t),
                        "broker_cpu_us_per_msg": _us_per_msg(t),
                        "max_delivery_gap_ms": _r(t.max_gap_s * 1000, 1),
                    },
                )
            )
            say(
                f"    produce {vb:>4} B acks={acks:<3}  {t.msgs_per_s:>10,.0f} msgs/s "
                f"{t.mb_per_s:7.1f} MB/s  p99 {t.p99_ms:6.1f} ms"
            )
            if acks == "1":
                samples.append(
                    consume_run(server, round_no, plan, topic=topic, value_bytes=vb, produced=t)
                )
            workloads.delete_topics(boot, [topic], server.data_dir)
    for acks in ACKS:
        e = workloads.e2e_latency(
            boot,
            topic=e2e_topics[acks],
            partitions=PARTITIONS,
            value_bytes=E2E_VALUE_BYTES,
            acks=acks,
            rate=plan.e2e_rate,
            seconds=plan.e2e_seconds,
            warmup_s=plan.e2e_warmup_s,
        )
        samples.append(
            Sample(
                system,
                "e2e-latency",
                E2E_VALUE_BYTES,
                acks,
                round_no,
                e.msgs_per_s,
                e.mb_per_s,
                e.p50_ms,
                e.p99_ms,
                {
                    "target_rate": e.rate,
                    "messages": e.sent,
                    "measured": e.measured,
                    "p999_ms": _r(e.p999_ms),
                    "max_ms": _r(e.max_ms),
                    "mean_ms": _r(e.mean_ms),
                },
            )
        )
        say(
            f"    e2e     {E2E_VALUE_BYTES:>4} B acks={acks:<3}  {e.msgs_per_s:>10,.0f} msgs/s "
            f"p50 {e.p50_ms:6.2f} ms  p99 {e.p99_ms:6.2f} ms"
        )


def consume_run(
    server: StreamBusServer | KafkaServer,
    round_no: int,
    plan: Plan,
    *,
    topic: str,
    value_bytes: int,
    produced: workloads.Throughput,
) -> Sample:
    """A fresh consumer reads everything ``produced`` wrote to ``topic``."""
    c = workloads.consume_throughput(
        server.bootstrap,
        server.pid,
        topic=topic,
        partitions=PARTITIONS,
        expected=produced.warmup_messages + produced.messages,
        value_bytes=value_bytes,
        warmup=plan.consume_warmup,
    )
    say(
        f"    consume {value_bytes:>4} B           {c.msgs_per_s:>10,.0f} msgs/s "
        f"{c.mb_per_s:7.1f} MB/s"
    )
    return Sample(
        server.system,
        "consume",
        value_bytes,
        "1",
        round_no,
        c.msgs_per_s,
        c.mb_per_s,
        None,
        None,
        {
            "messages": c.messages,
            "seconds": _r(c.seconds),
            **_cpu_extra(c),
            "broker_cpu_us_per_msg": _us_per_msg(c),
        },
    )


def telemetry_run(
    server: StreamBusServer, mode: str, round_no: int, plan: Plan, sink: OtlpSink
) -> Sample:
    before = sink.snapshot()
    topic = "bench-produce"
    workloads.create_topics(server.bootstrap, [topic], PARTITIONS)
    t = workloads.produce_throughput(
        server.bootstrap,
        server.pid,
        topic=topic,
        value_bytes=100,
        acks="1",
        messages=plan.telemetry_messages,
        warmup_s=plan.telemetry_warmup_s,
    )
    metric = server.messages_produced_metric()
    if mode == "tracing":
        time.sleep(1.0)  # the batch span processor exports every 500 ms
    after = sink.snapshot()
    return Sample(
        "streambus",
        "produce",
        100,
        "1",
        round_no,
        t.msgs_per_s,
        t.mb_per_s,
        t.p50_ms,
        t.p99_ms,
        {
            "telemetry": mode,
            "messages": t.messages,
            "seconds": _r(t.seconds),
            "broker_cpu_us_per_msg": _us_per_msg(t),
            **_cpu_extra(t),
            "metrics_messages_produced": metric,
            "otlp_requests": after[0] - before[0],
            "otlp_bytes": after[1] - before[1],
            "otlp_spans": after[2] - before[2],
        },
    )


def scrape_phase(plan: Plan, outcome: Outcome, args: argparse.Namespace) -> None:
    with broker("streambus", None, outcome, "streambus-scrape", args, mode="metrics") as server:
        assert isinstance(server, StreamBusServer)
        assert server.metrics_url is not None
        topics: list[str] = []
        for total in plan.scrape_partitions:
            new = [f"scrape-{i:04d}" for i in range(len(topics), total // SCRAPE_TOPIC_PARTITIONS)]
            workloads.create_topics(server.bootstrap, new, SCRAPE_TOPIC_PARTITIONS)
            workloads.produce_spread(
                server.bootstrap, new, SCRAPE_TOPIC_PARTITIONS, 100, per_partition=1
            )
            topics += new
            s = workloads.scrape(server.metrics_url, plan.scrape_count)
            outcome.scrape.append(
                {
                    "partitions": total,
                    "ms": _r(s.median_ms),
                    "bytes": s.bytes,
                    "max_ms": _r(s.max_ms),
                    "series": s.series,
                    "topics": len(topics),
                    "scrapes": plan.scrape_count,
                }
            )
            say(
                f"    {total:>5} partitions: /metrics median {s.median_ms:6.1f} ms, "
                f"{s.bytes:,} B, {s.series:,} series"
            )


def memory_phase(
    system: str, kafka: KafkaHome | None, plan: Plan, outcome: Outcome, args: argparse.Namespace
) -> dict[str, Any]:
    n_topics = plan.memory_partitions // SCRAPE_TOPIC_PARTITIONS
    topics = [f"mem-{i:04d}" for i in range(n_topics)]
    with broker(system, kafka, outcome, f"{system}-memory", args) as server:
        rss_start = server.rss_bytes()
        create_s = workloads.create_topics(server.bootstrap, topics, SCRAPE_TOPIC_PARTITIONS)
        time.sleep(2.0)
        rss_idle = server.rss_bytes()
        with workloads.RssSampler(server.rss_bytes) as sampler:
            sent, seconds = workloads.produce_spread(
                server.bootstrap,
                topics,
                SCRAPE_TOPIC_PARTITIONS,
                100,
                seconds=plan.memory_load_s,
            )
        rss_after = server.rss_bytes()
    result = {
        "partitions": plan.memory_partitions,
        "topics": n_topics,
        "create_seconds": _r(create_s),
        "rss_start_bytes": rss_start,
        "rss_idle_bytes": rss_idle,
        "rss_load_peak_bytes": sampler.peak,
        "rss_after_load_bytes": rss_after,
        "load_messages": sent,
        "load_seconds": _r(seconds),
        "load_msgs_per_s": _r(sent / seconds, 1),
    }
    say(
        f"    {system}: RSS start {rss_start / MIB:.0f} MiB, idle with "
        f"{plan.memory_partitions} partitions {rss_idle / MIB:.0f} MiB, under load peak "
        f"{sampler.peak / MIB:.0f} MiB ({sent:,} msgs in {seconds:.1f} s across all partitions)"
    )
    return result


# --------------------------------------------------------------------------- aggregation


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def _key(s: Sample) -> tuple[str, str, int, str]:
    return s.system, s.workload, s.value_bytes, s.acks


def aggregate(samples: list[Sample], suite: str) -> list[dict[str, Any]]:
    """One run entry per (system, workload, value size, acks[, telemetry]): medians over
    rounds, each round's figures beside them."""
    groups: dict[tuple[Any, ...], list[Sample]] = {}
    for s in samples:
        groups.setdefault((*_key(s), s.extra.get("telemetry")), []).append(s)
    runs = []
    for (system, workload, vb, acks, telemetry), group in groups.items():
        run: dict[str, Any] = {
            "system": system,
            "workload": workload,
            "value_bytes": vb,
            "acks": acks,
            "msgs_per_s": _r(_median([s.msgs_per_s for s in group]), 1),
            "mb_per_s": _r(_median([s.mb_per_s for s in group])),
            "p50_ms": _r(_median([s.p50_ms for s in group])),
            "p99_ms": _r(_median([s.p99_ms for s in group])),
            "broker_cpu_us_per_msg": _r(
                _median([s.extra.get("broker_cpu_us_per_msg") for s in group])
            ),
            "suite": suite,
            "telemetry": telemetry
            if telemetry is not None
            else (COMPARISON_MODE if system == "streambus" else None),
            "rounds": [
                {
                    "round": s.round,
                    "msgs_per_s": _r(s.msgs_per_s, 1),
                    "mb_per_s": _r(s.mb_per_s),
                    "p50_ms": _r(s.p50_ms),
                    "p99_ms": _r(s.p99_ms),
                    **{k: v for k, v in s.extra.items() if k != "telemetry"},
                }
                for s in group
            ],
        }
        runs.append(run)
    return runs


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """``ratio_vs_kafka`` on each StreamBus comparison run: msgs/s for throughput workloads,
    p50 and p99 latency for e2e (StreamBus / Kafka: above 1 is slower)."""
    kafka = {
        (r["workload"], r["value_bytes"], r["acks"]): r for r in runs if r["system"] == "kafka"
    }
    for r in runs:
        ref = kafka.get((r["workload"], r["value_bytes"], r["acks"]))
        if r["system"] != "streambus" or ref is None:
            continue
        if r["workload"] == "e2e-latency":
            r["ratio_vs_kafka"] = {
                "p50": _ratio(r["p50_ms"], ref["p50_ms"]),
                "p99": _ratio(r["p99_ms"], ref["p99_ms"]),
            }
        else:
            r["ratio_vs_kafka"] = _ratio(r["msgs_per_s"], ref["msgs_per_s"])
            r["cpu_per_msg_vs_kafka"] = _ratio(
                r["broker_cpu_us_per_msg"], ref["broker_cpu_us_per_msg"]
            )


def _ratio(a: float | None, b: float | None) -> float | None:
    return _r(a / b) if a is not None and b else None


def add_telemetry_costs(runs: list[dict[str, Any]]) -> None:
    """On each telemetry run: ``overhead_pct`` (throughput lost against ``off``) and
    ``broker_cpu_us_per_msg`` with ``broker_cpu_overhead_pct`` (the broker's CPU time per
    message against ``off``; the better measure while the client is the bottleneck)."""
    for r in runs:
        r["broker_cpu_us_per_msg"] = _r(_median([x["broker_cpu_us_per_msg"] for x in r["rounds"]]))
    base = next((r for r in runs if r["telemetry"] == "off"), None)
    if base is None:
        return
    for r in runs:
        if r is base:
            continue
        r["overhead_pct"] = _pct_lost(base["msgs_per_s"], r["msgs_per_s"])
        cost, base_cost = r["broker_cpu_us_per_msg"], base["broker_cpu_us_per_msg"]
        r["broker_cpu_overhead_pct"] = (
            _r((cost - base_cost) / base_cost * 100, 2) if cost and base_cost else None
        )


def _pct_lost(base: float | None, other: float | None) -> float | None:
    return _r((base - other) / base * 100, 2) if base and other is not None else None


def telemetry_overhead(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Produce throughput lost against ``off``, in percent (negative: faster), and the
    broker's CPU time per message by mode with its increase against ``off``, in percent."""
    by_mode = {r["telemetry"]: r["msgs_per_s"] for r in runs}
    cpu = {r["telemetry"]: r.get("broker_cpu_us_per_msg") for r in runs}
    base = by_mode.get("off")
    return {
        "metrics_pct": _pct_lost(base, by_mode.get("metrics")),
        "tracing_pct": _pct_lost(base, by_mode.get("tracing")),
        # The steadier measure: the broker's CPU time per message, on against off.
        "broker_cpu_us_per_msg": cpu,
        "metrics_cpu_pct": _cpu_pct_more(cpu.get("off"), cpu.get("metrics")),
        "tracing_cpu_pct": _cpu_pct_more(cpu.get("off"), cpu.get("tracing")),
    }


def _cpu_pct_more(base: float | None, other: float | None) -> float | None:
    return _r((other - base) / base * 100, 2) if base and other is not None else None


def _fs_type(path: Path) -> str:
    """The filesystem type /proc/mounts gives for the mount that holds ``path``."""
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


# --------------------------------------------------------------------------- report


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each goal of the issue; met is None when not measured."""
    runs = result["runs"]
    out: list[tuple[str, str, bool | None]] = []
    for workload in ("produce", "consume"):
        ratios = [
            (r["value_bytes"], r["acks"], r.get("ratio_vs_kafka"))
            for r in runs
            if r["system"] == "streambus"
            and r["suite"] == "comparison"
            and r["workload"] == workload
        ]
        present = [x for x in ratios if x[2] is not None]
        if present:
            worst = min(present, key=lambda x: x[2])
            measured = f"lowest {worst[2]:.2f}x ({worst[0]} B, acks={worst[1]}); " + ", ".join(
                f"{vb} B/{acks}: {ratio:.2f}x" for vb, acks, ratio in present
            )
            met: bool | None = worst[2] >= GOAL_THROUGHPUT_RATIO
        else:
            measured, met = "not measured", None
        out.append(
            (f"{workload} throughput >= {GOAL_THROUGHPUT_RATIO}x Kafka (aim 1.0x)", measured, met)
        )
    overhead = result["telemetry_overhead"]
    cpu_cost = {
        r["telemetry"]: r.get("broker_cpu_overhead_pct") for r in runs if r["suite"] == "telemetry"
    }
    for key, mode, label, limit in (
        ("metrics_pct", "metrics", "metrics overhead", GOAL_METRICS_PCT),
        ("tracing_pct", "tracing", "tracing (100 % sampled) overhead", GOAL_TRACING_PCT),
    ):
        value = overhead.get(key)
        cpu = cpu_cost.get(mode)
        measured = "not measured" if value is None else f"{value:+.1f} % of produce throughput"
        if cpu is not None:
            measured += f" (broker CPU per message {cpu:+.1f} %)"
        out.append(
            (f"{label} <= {limit:.0f} %", measured, None if value is None else value <= limit)
        )
    at_1000 = [s for s in result["scrape"] if s["partitions"] == 1000]
    out.append(
        (
            f"/metrics scrape < {GOAL_SCRAPE_MS:.0f} ms at 1000 partitions",
            f"{at_1000[0]['ms']:.1f} ms" if at_1000 else "not measured",
            at_1000[0]["ms"] < GOAL_SCRAPE_MS if at_1000 else None,
        )
    )
    for st in result.get("stalls", []):
        out.append(
            (
                f"event-loop stall < {GOAL_STALL_MS:.0f} ms: {st['name']}",
                f"{st['max_stall_ms']:,.0f} ms" + (f" ({st['error']})" if st["error"] else ""),
                st["max_stall_ms"] < GOAL_STALL_MS and not st["error"],
            )
        )
    idle = result["memory"].get("streambus", {}).get("rss_idle_bytes")
    out.append(
        (
            f"idle RSS < {GOAL_IDLE_RSS_MIB:.0f} MiB with 1000 partitions",
            "not measured" if idle is None else f"{idle / MIB:.1f} MiB",
            None if idle is None else idle / MIB < GOAL_IDLE_RSS_MIB,
        )
    )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _render_cpu(runs: list[dict[str, Any]]) -> list[str]:
    """Each broker's own CPU time per message, the figure a busy 2-core machine moves least."""
    kafka = {
        (r["workload"], r["value_bytes"], r["acks"]): r for r in runs if r["system"] == "kafka"
    }
    rows = [
        r for r in runs if r["system"] == "streambus" and r["workload"] in ("produce", "consume")
    ]
    if not rows:
        return []
    out = [
        "",
        "Broker CPU per message (µs; utime+stime of the broker process from /proc over the "
        "timed window, median of rounds)",
        f"{'workload':<13}{'value':>7}{'acks':>5} | {'StreamBus':>10} | {'Kafka':>8} | "
        f"{'SB/Kafka':>9}",
    ]
    for r in rows:
        k = kafka.get((r["workload"], r["value_bytes"], r["acks"]), {})
        out.append(
            f"{r['workload']:<13}{r['value_bytes']:>5} B{r['acks']:>5} | "
            f"{_fmt(r.get('broker_cpu_us_per_msg'), '.2f'):>10} | "
            f"{_fmt(k.get('broker_cpu_us_per_msg'), '.2f'):>8} | "
            f"{_fmt(r.get('cpu_per_msg_vs_kafka'), '.2f') + 'x':>9}"
        )
    return out


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    plan = m["plan"]
    lines = [
        f"StreamBus vs Apache Kafka {m.get('kafka_version', '?')}: {plan['name']} run, "
        f"{m['cpu_count']} CPUs, Python {m['python_version']}, librdkafka {m['librdkafka']}, "
        f"{m['wall_seconds']:.0f} s",
        f"load average at start {m['loadavg_start']}, at end {m['loadavg_end']}",
        "",
        f"Comparison: medians of {plan['rounds']} round(s) per system, order "
        f"{' '.join('A' if s == 'streambus' else 'B' for s in m['order'])} "
        "(A = StreamBus, B = Kafka); 3 partitions, linger.ms=5",
        "",
        f"{'workload':<13}{'value':>7}{'acks':>5} | {'StreamBus msgs/s':>16}{'MB/s':>8}"
        f"{'p50 ms':>8}{'p99 ms':>8} | {'Kafka msgs/s':>13}{'MB/s':>8}{'p50 ms':>8}"
        f"{'p99 ms':>8} | {'SB/Kafka':>9}",
    ]
    runs = [r for r in result["runs"] if r["suite"] == "comparison"]
    kafka = {
        (r["workload"], r["value_bytes"], r["acks"]): r for r in runs if r["system"] == "kafka"
    }
    for r in (r for r in runs if r["system"] == "streambus"):
        k = kafka.get((r["workload"], r["value_bytes"], r["acks"]), {})
        ratio = r.get("ratio_vs_kafka")
        if isinstance(ratio, dict):
            ratio_text = f"p99 {_fmt(ratio.get('p99'), '.2f')}x"
        else:
            ratio_text = f"{_fmt(ratio, '.2f')}x"
        lines.append(
            f"{r['workload']:<13}{r['value_bytes']:>5} B{r['acks']:>5} | "
            f"{_fmt(r['msgs_per_s'], ',.0f'):>16}{_fmt(r['mb_per_s'], '.1f'):>8}"
            f"{_fmt(r['p50_ms'], '.2f'):>8}{_fmt(r['p99_ms'], '.2f'):>8} | "
            f"{_fmt(k.get('msgs_per_s'), ',.0f'):>13}{_fmt(k.get('mb_per_s'), '.1f'):>8}"
            f"{_fmt(k.get('p50_ms'), '.2f'):>8}{_fmt(k.get('p99_ms'), '.2f'):>8} | "
            f"{ratio_text:>9}"
        )
    noise = []
    for system in ("streambus", "kafka"):
        other = _median(
            [
                x.get("other_cpu_pct")
                for r in runs
                if r["system"] == system and r["workload"] in ("produce", "consume")
                for x in r["rounds"]
            ]
        )
        if other is not None:
            noise.append(f"{system} turns {other:.0f} %")
    lines += [
        "",
        "produce p50/p99: delivery latency (produce() to acknowledgement) under full load;",
        "consume reads the acks=1 data just produced; e2e-latency: fixed rate "
        f"{plan['e2e_rate']:,.0f} msg/s, receive - send; MB/s = value bytes, 1 MB = 10^6 B.",
    ]
    if noise:
        lines.append(
            "CPU taken by other processes in the timed windows (median, % of one core): "
            + ", ".join(noise)
        )
    lines += _render_cpu(runs)
    tele = [r for r in result["runs"] if r["suite"] == "telemetry"]
    if tele:
        base = next((r["msgs_per_s"] for r in tele if r["telemetry"] == "off"), None)
        lines += [
            "",
            f"StreamBus telemetry overhead (produce, 100 B, acks=1, medians of "
            f"{plan['telemetry_rounds']} rounds)",
            f"{'mode':<10}{'msgs/s':>12}{'overhead':>10}{'broker µs/msg':>15}{'spans':>8}"
            "   per round (msgs/s)",
        ]
        for r in tele:
            over = (
                ""
                if r["telemetry"] == "off" or not base
                else f"{(base - r['msgs_per_s']) / base * 100:+.1f}%"
            )
            cost = r.get("broker_cpu_us_per_msg")
            spans = sum(x["otlp_spans"] for x in r["rounds"])
            per_round = ", ".join(f"{x['msgs_per_s']:,.0f}" for x in r["rounds"])
            lines.append(
                f"{r['telemetry']:<10}{r['msgs_per_s']:>12,.0f}{over:>10}"
                f"{_fmt(cost, '.2f'):>15}{spans:>8}   {per_round}"
            )
        over = result["telemetry_overhead"]
        cpu = over.get("broker_cpu_us_per_msg") or {}
        if cpu.get("off"):
            lines.append(
                "telemetry cost as StreamBus CPU per message: off "
                f"{_fmt(cpu.get('off'), '.2f')} µs, metrics {_fmt(cpu.get('metrics'), '.2f')} µs "
                f"({_fmt(over.get('metrics_cpu_pct'), '+.1f')} %), tracing "
                f"{_fmt(cpu.get('tracing'), '.2f')} µs "
                f"({_fmt(over.get('tracing_cpu_pct'), '+.1f')} %)"
            )
    if result["scrape"]:
        lines += ["", "StreamBus /metrics scrape (median of timed GETs)"]
        lines.append(f"{'partitions':>10}{'median ms':>11}{'max ms':>9}{'bytes':>12}{'series':>9}")
        for s in result["scrape"]:
            lines.append(
                f"{s['partitions']:>10}{s['ms']:>11.1f}{s['max_ms']:>9.1f}"
                f"{s['bytes']:>12,}{s['series']:>9,}"
            )
    mem = result["memory"]
    if mem:
        lines += ["", "Broker RSS with 1000 partitions (MiB)"]
        lines.append(f"{'system':<11}{'start':>8}{'idle':>8}{'load peak':>11}{'after':>8}")
        for system in ("streambus", "kafka"):
            if system in mem:
                x = mem[system]
                lines.append(
                    f"{system:<11}{x['rss_start_bytes'] / MIB:>8.1f}"
                    f"{x['rss_idle_bytes'] / MIB:>8.1f}{x['rss_load_peak_bytes'] / MIB:>11.1f}"
                    f"{x['rss_after_load_bytes'] / MIB:>8.1f}"
                )
        if "kafka" not in mem and not plan["kafka_memory"]:
            lines.append("kafka: measured in the full run only")
    if result.get("stalls"):
        lines += [
            "",
            "StreamBus event-loop stalls (longest ApiVersions round trip of a probe every 10 ms)",
        ]
        for st in result["stalls"]:
            detail = ", ".join(f"{k} {v}" for k, v in st["detail"].items())
            lines.append(
                f"  {st['max_stall_ms']:>9,.0f} ms  {st['name']} ({st['seconds']:.1f} s; {detail})"
                + (f" ERROR {st['error']}" if st["error"] else "")
            )
    lines += ["", "Goals (reported, not asserted)"]
    for goal, measured, met in goals(result):
        status = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"  [{status:^7}] {goal}: {measured}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build_result(outcome: Outcome, machine: dict[str, Any]) -> dict[str, Any]:
    comparison = aggregate(outcome.comparison, "comparison")
    add_ratios(comparison)
    telemetry = aggregate(outcome.telemetry, "telemetry")
    add_telemetry_costs(telemetry)
    return {
        "machine": machine,
        "runs": comparison + telemetry,
        "telemetry_overhead": telemetry_overhead(telemetry),
        "scrape": outcome.scrape,
        "memory": outcome.memory,
        "stalls": outcome.stalls,
    }


def _phase(outcome: Outcome, name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        outcome.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        say(f"  FAILED: {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc()


def run(plan: Plan, args: argparse.Namespace) -> tuple[dict[str, Any], Outcome]:
    started = time.monotonic()
    outcome = Outcome()
    machine: dict[str, Any] = machine_info()
    machine.update(
        started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        loadavg_start=loadavg(),
        plan=asdict(plan),
        work_dir=str(args.work_dir),
        work_dir_fs=_fs_type(args.work_dir),
        streambus_comparison_mode=COMPARISON_MODE,
    )
    kafka: KafkaHome | None = None
    if not args.no_kafka:
        kafka = ensure_kafka()
        machine.update(
            kafka_version=kafka.version,
            kafka_fetch_seconds=_r(kafka.fetch_seconds, 1),
            java=java_version(),
            kafka_jvm="-Xmx1G -Xms1G, G1 (Kafka's start-script defaults)",
        )
    systems = ["streambus"] if kafka is None else ["streambus", "kafka"]

    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase_done(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 1)
        mark = now

    say(f"[1/5] comparison: {plan.rounds} round(s) of {' then '.join(systems)}")
    for round_no in range(1, plan.rounds + 1):
        for system in systems:
            label = f"{system}-round{round_no}"
            say(f"  round {round_no}: {system}")
            outcome.order.append(system)

            def turn(system: str = system, label: str = label, round_no: int = round_no) -> None:
                with broker(system, kafka, outcome, label, args) as server:
                    comparison_turn(server, round_no, plan, outcome.comparison)

            _phase(outcome, label, turn)

    phase_done("comparison")
    say(f"[2/5] telemetry overhead: {plan.telemetry_rounds} round(s) of off, metrics, tracing")
    with OtlpSink() as sink:
        for round_no in range(1, plan.telemetry_rounds + 1):
            for mode in TELEMETRY_MODES:
                label = f"streambus-{mode}-round{round_no}"

                def tele(mode: str = mode, label: str = label, round_no: int = round_no) -> None:
                    with broker("streambus", None, outcome, label, args, mode=mode, sink=sink) as s:
                        assert isinstance(s, StreamBusServer)
                        sample = telemetry_run(s, mode, round_no, plan, sink)
                    outcome.telemetry.append(sample)
                    extra = sample.extra
                    say(
                        f"  round {round_no} {mode:<8} {sample.msgs_per_s:>10,.0f} msgs/s, "
                        f"broker {extra['broker_cpu_us_per_msg']:.2f} µs/msg"
                        + (f", {extra['otlp_spans']} spans exported" if mode == "tracing" else "")
                    )
                    if mode == "tracing" and not extra["otlp_spans"]:
                        raise RuntimeError("tracing mode exported no spans to the OTLP sink")

                _phase(outcome, label, tele)

    phase_done("telemetry")
    say(f"[3/5] /metrics scrape at {', '.join(map(str, plan.scrape_partitions))} partitions")
    _phase(outcome, "scrape", lambda: scrape_phase(plan, outcome, args))

    phase_done("scrape")
    say(f"[4/5] memory with {plan.memory_partitions} partitions")
    for system in systems:
        if system == "kafka" and not plan.kafka_memory:
            say("    kafka: skipped in a quick run (full run only)")
            continue

        def mem(system: str = system) -> None:
            outcome.memory[system] = memory_phase(system, kafka, plan, outcome, args)

        _phase(outcome, f"{system}-memory", mem)
    if "streambus" in outcome.memory:
        outcome.memory["streambus_idle_rss_mib"] = _r(
            outcome.memory["streambus"]["rss_idle_bytes"] / MIB, 1
        )
        outcome.memory["streambus_load_rss_mib"] = _r(
            outcome.memory["streambus"]["rss_load_peak_bytes"] / MIB, 1
        )
    if "kafka" in outcome.memory:
        outcome.memory["kafka_idle_rss_mib"] = _r(
            outcome.memory["kafka"]["rss_idle_bytes"] / MIB, 1
        )
        outcome.memory["kafka_load_rss_mib"] = _r(
            outcome.memory["kafka"]["rss_load_peak_bytes"] / MIB, 1
        )

    phase_done("memory")
    say(
        f"[5/5] event-loop stalls: compaction of {plan.stalls.compaction_bytes // MIB} MiB, a "
        f"{plan.stalls.fetch_bytes // MIB} MiB fetch with tracing on, a Produce to "
        f"{plan.stalls.produce_partitions:,} partitions"
    )

    def stalls() -> None:
        for s in stall.bench_stalls(plan.stalls, args.work_dir, args.log_dir):
            say(f"    {s.line()}")
            outcome.stalls.append(
                {
                    "name": s.name,
                    "max_stall_ms": _r(s.max_stall_ms, 1),
                    "seconds": _r(s.seconds),
                    "probes": s.samples,
                    "detail": s.detail,
                    "error": s.error,
                }
            )

    _phase(outcome, "stalls", stalls)
    phase_done("stalls")
    machine.update(
        phase_seconds=phases,
        order=outcome.order,
        kafka_start_seconds=[_r(x, 2) for x in outcome.kafka_start_s],
        loadavg_end=loadavg(),
        wall_seconds=_r(time.monotonic() - started, 1),
        broker_log_problems=outcome.log_problems,
        errors=outcome.errors,
    )
    return build_result(outcome, machine), outcome


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=" ".join((__doc__ or "").split("\n\n")[0].split())
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about 3.5 minutes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--rounds", type=int, help="comparison rounds per system (default: 3, quick 2)"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=DEFAULT_LOG_DIR,
        help="keep each broker's log here (default: %(default)s)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="parent of both systems' temporary data directories (default: %(default)s)",
    )
    parser.add_argument(
        "--no-kafka", action="store_true", help="StreamBus only (no Java, no comparison)"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="print the report of an earlier results file and exit (runs nothing)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return 0
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
        plan = replace(plan, rounds=args.rounds)
    args.work_dir = args.work_dir.resolve()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        for old in args.log_dir.glob("*.log"):
            old.unlink()
    try:
        result, outcome = run(plan, args)
    except KeyboardInterrupt:
        print("\ninterrupted; every broker was stopped", file=sys.stderr)
        return 130
    print()
    print(render(result))
    if outcome.log_problems:
        print(f"\nbroker WARNING/ERROR log lines ({len(outcome.log_problems)}):")
        for line in outcome.log_problems[:40]:
            print(f"  {line}")
        if len(outcome.log_problems) > 40:
            print(f"  ... {len(outcome.log_problems) - 40} more in {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}" + (f"; broker logs in {args.log_dir}" if args.log_dir else ""))
    if outcome.errors:
        print(f"\n{len(outcome.errors)} part(s) failed:", file=sys.stderr)
        for err in outcome.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
