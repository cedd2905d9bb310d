"""Produce throughput of a StreamBus broker, by telemetry mode.

Each run starts a fresh ``streambus serve`` subprocess on free 127.0.0.1
ports with a temporary data directory, creates a 3-partition topic with the
AdminClient, warms up, then times one confluent-kafka producer sending a fixed
number of messages (from the first ``produce()`` to ``flush()`` returning).
Modes run interleaved over ``--rounds`` so that drift on a small, noisy
machine spreads over all of them; the median of each mode is reported.

Modes:

* ``off``: ``--metrics-port 0 --no-tracing`` (no /metrics endpoint, no tracer
  provider).
* ``metrics``: /metrics endpoint on, ``--no-tracing``.
* ``tracing``: /metrics on, tracing on with ``OTEL_TRACES_SAMPLER=always_on``,
  spans exported over OTLP/HTTP to a sink in this process that answers 200
  and counts the bytes it receives.
* ``sdk-disabled`` (not run by default): as ``off`` plus
  ``OTEL_SDK_DISABLED=true``, so the SDK hands out no-op meters too.

Run: ``.venv/bin/python -m bench.produce [--rounds 2] [--messages 200000]
[--json results.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException

from bench.common import machine_info
from bench.otlp import OtlpSink
from bench.streambus_server import running_streambus
from bench.workloads import create_topics, produce_throughput

TOPIC = "bench-produce"
PARTITIONS = 3
DEFAULT_MODES = ("off", "metrics", "tracing")
ALL_MODES = (*DEFAULT_MODES, "sdk-disabled")


# --------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    mode: str
    round: int
    messages: int
    seconds: float
    value_bytes: int
    max_delivery_gap_s: float
    broker_cpu_s: float
    client_cpu_s: float
    spans_bytes: int
    spans_requests: int
    spans: int
    metric_messages: float | None
    problem_lines: list[str]

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    @property
    def broker_us_per_msg(self) -> float:
        return self.broker_cpu_s / self.messages * 1e6

    @property
    def mb_per_s(self) -> float:
        return self.messages * self.value_bytes / self.seconds / 1e6


def run_once(mode: str, round_no: int, args: argparse.Namespace, sink: OtlpSink) -> RunResult:
    requests_before, bytes_before, spans_before = sink.snapshot()
    keep_log = None if args.log_dir is None else args.log_dir / f"{mode}-round{round_no}.log"
    with running_streambus(mode, sink, keep_log=keep_log) as broker:
        create_topics(broker.bootstrap, [TOPIC], PARTITIONS)
        try:
            result = produce_throughput(
                broker.bootstrap,
                broker.pid,
                topic=TOPIC,
                value_bytes=args.value_bytes,
                acks=args.acks,
                messages=args.messages,
                warmup_s=args.warmup_s,
            )
        except RuntimeError as exc:
            raise RuntimeError(
                f"{mode} round {round_no}: {exc}\nbroker log:\n{broker.tail()}"
            ) from exc
        metric_messages = broker.messages_produced_metric()
        if mode == "tracing":
            time.sleep(1.0)  # the batch span processor exports every 500 ms
        code = broker.stop()
        problems = broker.problem_lines()
        if code != 0:
            raise RuntimeError(
                f"{mode} round {round_no}: broker exited {code} after SIGTERM:\n" + broker.tail()
            )
    requests_after, bytes_after, spans_after = sink.snapshot()
    return RunResult(
        mode=mode,
        round=round_no,
        messages=args.messages,
        seconds=result.seconds,
        value_bytes=args.value_bytes,
        max_delivery_gap_s=result.max_gap_s,
        broker_cpu_s=result.broker_cpu_s,
        client_cpu_s=result.client_cpu_s,
        spans_bytes=bytes_after - bytes_before,
        spans_requests=requests_after - requests_before,
        spans=spans_after - spans_before,
        metric_messages=metric_messages,
        problem_lines=problems,
    )


# --------------------------------------------------------------------------- report


def overhead_pct(base: float, other: float) -> float:
    """Throughput lost relative to ``base``, in percent (negative: faster than base)."""
    return (base - other) / base * 100.0


def report(results: list[RunResult], modes: Sequence[str], args: argparse.Namespace) -> str:
    medians = {m: statistics.median(r.msgs_per_s for r in results if r.mode == m) for m in modes}
    lines = [
        f"StreamBus produce: {args.messages} msgs x {args.value_bytes} B, acks={args.acks}, "
        f"linger.ms=5, {PARTITIONS} partitions, {args.rounds} round(s), "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "",
        f"{'mode':<13}{'msgs/s':>10}{'MB/s':>8}{'overhead':>10}{'broker µs/msg':>15}"
        "   per round (msgs/s)",
    ]
    for m in modes:
        runs = [r for r in results if r.mode == m]
        msgs = medians[m]
        mb = statistics.median(r.mb_per_s for r in runs)
        over = (
            ""
            if m == "off" or "off" not in medians
            else f"{overhead_pct(medians['off'], msgs):+.1f}%"
        )
        cost = statistics.median(r.broker_us_per_msg for r in runs)
        per_round = ", ".join(f"{r.msgs_per_s:,.0f}" for r in runs)
        lines.append(f"{m:<13}{msgs:>10,.0f}{mb:>8.2f}{over:>10}{cost:>15.2f}   {per_round}")
    lines += [
        "",
        "MB/s counts value bytes only (1 MB = 10^6 B); overhead = throughput lost vs off;",
        "broker µs/msg = broker process CPU time (user+sys) in the timed window / messages.",
    ]
    for r in results:
        notes = [
            f"{r.seconds:.2f} s",
            f"CPU broker {r.broker_cpu_s / r.seconds:.0%} client {r.client_cpu_s / r.seconds:.0%}",
            f"max delivery-report gap {r.max_delivery_gap_s * 1000:.0f} ms",
        ]
        if r.metric_messages is not None:
            notes.append(f"/metrics messages_produced={r.metric_messages:.0f}")
        if r.mode == "tracing":
            notes.append(
                f"OTLP sink got {r.spans} spans in {r.spans_requests} requests, {r.spans_bytes:,} B"
            )
        notes.append(f"{len(r.problem_lines)} WARNING/ERROR log lines")
        lines.append(f"  {r.mode} round {r.round}: " + "; ".join(notes))
    return "\n".join(lines)


def to_json(results: list[RunResult], modes: Sequence[str], args: argparse.Namespace) -> Any:
    runs = []
    medians: dict[str, float] = {}
    for m in modes:
        mine = [r for r in results if r.mode == m]
        medians[m] = statistics.median(r.msgs_per_s for r in mine)
        runs.append(
            {
                "system": "streambus",
                "workload": "produce",
                "telemetry": m,
                "value_bytes": args.value_bytes,
                "acks": str(args.acks),
                "msgs_per_s": round(medians[m], 1),
                "mb_per_s": round(statistics.median(r.mb_per_s for r in mine), 3),
                "messages": args.messages,
                "rounds_msgs_per_s": [round(r.msgs_per_s, 1) for r in mine],
                "otlp_bytes_received": sum(r.spans_bytes for r in mine),
                "otlp_spans_received": sum(r.spans for r in mine),
                "broker_cpu_us_per_msg": round(
                    statistics.median(r.broker_us_per_msg for r in mine), 3
                ),
            }
        )
    overhead: dict[str, float] = {}
    if "off" in medians:
        for m, key in (("metrics", "metrics_pct"), ("tracing", "tracing_pct")):
            if m in medians:
                overhead[key] = round(overhead_pct(medians["off"], medians[m]), 2)
    return {"machine": machine_info(), "runs": runs, "telemetry_overhead": overhead}


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.produce", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=1_000_000, help="timed messages per run")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per message value")
    parser.add_argument(
        "--warmup-s", type=float, default=0.5, help="seconds of untimed produce first"
    )
    parser.add_argument("--acks", default="1", choices=["0", "1", "-1", "all"], help="acks")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all modes")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from {', '.join(ALL_MODES)} (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write results as JSON here")
    parser.add_argument(
        "--log-dir", type=Path, metavar="DIR", help="keep each broker's log here (MODE-roundN.log)"
    )
    args = parser.parse_args(argv)
    modes = [m.strip() for m in str(args.modes).split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(ALL_MODES)}")
    if args.messages < 1 or args.rounds < 1 or args.value_bytes < 0:
        parser.error("--messages and --rounds must be >= 1, --value-bytes >= 0")
    args.modes = modes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes: list[str] = args.modes
    results: list[RunResult] = []
    with OtlpSink() as sink:
        for round_no in range(1, args.rounds + 1):
            for mode in modes:
                print(f"round {round_no}/{args.rounds}: {mode} ...", end=" ", flush=True)
                try:
                    result = run_once(mode, round_no, args, sink)
                except (KafkaException, RuntimeError, TimeoutError) as exc:
                    print("FAILED")
                    print(exc, file=sys.stderr)
                    return 1
                results.append(result)
                print(f"{result.msgs_per_s:,.0f} msgs/s", flush=True)
    if "tracing" in modes and not any(r.spans_bytes for r in results if r.mode == "tracing"):
        print("tracing mode exported no spans to the OTLP sink", file=sys.stderr)
        return 1
    print()
    print(report(results, modes, args))
    problems = [(r, line) for r in results for line in r.problem_lines]
    if problems:
        print("\nbroker WARNING/ERROR log lines:")
        for r, line in problems:
            print(f"  [{r.mode} round {r.round}] {line}")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(results, modes, args), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
