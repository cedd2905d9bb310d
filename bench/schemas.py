"""Schema validation: produce throughput to a topic with validation off, id-only and full.

One ``streambus serve`` on 127.0.0.1 with its schema registry on (``--schema-registry-port``),
an Avro record schema (one string field) registered through the registry's REST API
(``POST /subjects/{subject}/versions``) under each topic's ``<topic>-value`` subject, and three
1-partition topics per record size:

* ``off``: no validation (the baseline: nothing decoded);
* ``id``: ``confluent.value.schema.validation=true`` (magic byte and registered id checked);
* ``full``: the same with ``streambus.value.schema.validation.mode=full`` (every value
  decoded with fastavro against the schema).

One confluent-kafka producer (``linger.ms=5``, ``acks=all``) sends the same pre-encoded values
(magic byte 0, the schema id, the Avro body) of 100 B and 1 KiB to each topic in turn, after a
warm-up; reported: messages/s and MB/s from the first ``produce()`` to ``flush()`` returning.
Every record must be acknowledged (a refusal fails the run). Results go to
``bench/results/schemas.json``; goals are not asserted.

    .venv/bin/python -m bench.schemas [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.common import ROOT, free_port, machine_info, run_and_report
from bench.streambus_server import StreamBusServer

OUT = ROOT / "bench" / "results" / "schemas.json"
LOG_DIR = ROOT / "bench" / "results" / "logs" / "schemas"
SCHEMA = {
    "type": "record",
    "name": "Event",
    "namespace": "bench",
    "fields": [{"name": "body", "type": "string"}],
}
SIZES = (100, 1024)
MODES = ("off", "id", "full")
MESSAGES = {100: 200_000, 1024: 50_000}
QUICK_MESSAGES = {100: 30_000, 1024: 10_000}
WARMUP = 2_000


@dataclass
class Row:
    size: int
    mode: str
    messages: int
    seconds: float
    msgs_per_s: float
    mb_per_s: float


@dataclass
class Result:
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def register(port: int, subject: str, schema: dict[str, Any]) -> int:
    """Register ``schema`` (Avro) under ``subject`` through the REST API; its id."""
    body = json.dumps({"schemaType": "AVRO", "schema": json.dumps(schema)}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/subjects/{subject}/versions",
        data=body,
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return int(json.loads(response.read())["id"])


def encoded(schema_id: int, size: int) -> bytes:
    """A value of ``size`` bytes: magic byte, id, and an Avro record padded to fit."""
    parsed = fastavro.parse_schema(SCHEMA)
    body = size - 5 - 2  # a string of up to 8191 bytes takes a 2-byte length
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, {"body": "x" * body})
    return b"\x00" + struct.pack(">I", schema_id) + out.getvalue()


def produce(bootstrap: str, topic: str, value: bytes, count: int) -> float:
    """Seconds to send ``count`` records and have each acknowledged."""
    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "batch.size": 1_000_000}
    )
    for _ in range(WARMUP):
        producer.produce(topic, value, on_delivery=delivered)
    producer.flush(30)
    started = time.perf_counter()
    for _ in range(count):
        while True:
            try:
                producer.produce(topic, value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(120)
    seconds = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{len(failed)} records refused on {topic}: {failed[0]}")
    return seconds


def bench(result: Result, quick: bool) -> None:
    counts = QUICK_MESSAGES if quick else MESSAGES
    with tempfile.TemporaryDirectory(prefix="bench-schemas-") as tmp:
        registry_port = free_port()
        server = StreamBusServer(Path(tmp), "metrics")
        server.cmd += ["--schema-registry-port", str(registry_port)]
        try:
            server.start()
            bootstrap = f"127.0.0.1:{server.port}"
            admin = AdminClient({"bootstrap.servers": bootstrap})
            topics = []
            for size in SIZES:
                for mode in MODES:
                    configs = {}
                    if mode != "off":
                        configs["confluent.value.schema.validation"] = "true"
                        configs["streambus.value.schema.validation.mode"] = mode
                    topics.append(NewTopic(f"events-{size}-{mode}", 1, 1, config=configs))
            for future in admin.create_topics(topics).values():
                future.result(30)
            for size in SIZES:
                for mode in MODES:
                    topic = f"events-{size}-{mode}"
                    schema_id = register(registry_port, f"{topic}-value", SCHEMA)
                    value = encoded(schema_id, size)
                    seconds = produce(bootstrap, topic, value, counts[size])
                    n = counts[size]
                    result.rows.append(
                        Row(size, mode, n, seconds, n / seconds, n * len(value) / seconds / 1e6)
                    )
                    print(f"{size:>5} B {mode:>4}: {n / seconds:>10,.0f} msg/s", flush=True)
        finally:
            server.kill()
            server.keep_log(LOG_DIR / "broker.log")


def render(result: Result) -> str:
    lines = [
        "Produce throughput by schema validation mode (one producer, linger.ms=5, acks=all)",
        f"{'record':>8} {'mode':>5} {'messages':>9} {'msg/s':>10} {'MB/s':>7} {'vs off':>7}",
    ]
    base = {r.size: r.msgs_per_s for r in result.rows if r.mode == "off"}
    for r in result.rows:
        ratio = r.msgs_per_s / base[r.size] if base.get(r.size) else float("nan")
        lines.append(
            f"{r.size:>6} B {r.mode:>5} {r.messages:>9,} {r.msgs_per_s:>10,.0f} "
            f"{r.mb_per_s:>7.1f} {ratio:>6.0%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    args = parser.parse_args(argv)
    result = Result(machine_info())
    return run_and_report(
        [("streambus", lambda: bench(result, args.quick))], result, render, OUT, LOG_DIR
    )


if __name__ == "__main__":
    sys.exit(main())
