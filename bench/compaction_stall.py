"""Event-loop stall while a large compacted topic is cleaned.

Builds a compacted topic of ``--mb`` megabytes through a real producer (many records per
key), then runs one maintenance pass on the broker's loop while a second connection pings
it with ApiVersions every 10 ms. Prints the slowest ping during the pass; asserts nothing.

    .venv/bin/python -m bench.compaction_stall --mb 200
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from kafka.protocol.metadata import ApiVersionsRequest

from tests.harness import BrokerThread, RawClient

TOPIC = "compacted"


def produce(bootstrap: str, megabytes: int, keys: int, value_size: int) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 256 * 1024})
    value = b"v" * value_size
    count = megabytes * 1024 * 1024 // value_size
    for i in range(count):
        while True:
            try:
                producer.produce(TOPIC, value, key=b"key-%d" % (i % keys))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    return count


async def one_pass(broker: Any) -> None:
    now_ms = int(time.time() * 1000)
    if hasattr(broker.logs, "maintain"):  # maintenance with its slow parts in worker threads
        await broker.logs.maintain(now_ms)
    else:  # the older, synchronous maintenance
        broker.logs.maintenance(now_ms)


def ping(bootstrap: str, done: Event, results: multiprocessing.Queue[list[float]]) -> None:
    """In a process of its own, so it competes with the broker for CPU, not for its GIL."""
    rtts: list[float] = []
    with RawClient(bootstrap, timeout=120) as client:
        while not done.is_set():
            sent = time.monotonic()
            client.request(ApiVersionsRequest(), 0)
            rtts.append(time.monotonic() - sent)
            time.sleep(0.01)
    results.put(rtts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--value-size", type=int, default=1000)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        BrokerThread(Path(tmp), maintenance_interval_ms=3_600_000, metrics=False) as b,
    ):
        config = {"cleanup.policy": "compact", "segment.bytes": str(16 * 1024 * 1024)}
        b.run(b.broker.create_topic, TOPIC, 1, config)
        started = time.monotonic()
        count = produce(b.bootstrap, args.mb, args.keys, args.value_size)
        size = b.run(b.broker.storage_used_bytes)
        print(f"produced {count} records, {size / 1e6:.0f} MB in {time.monotonic() - started:.1f}s")

        ctx = multiprocessing.get_context("spawn")
        done = ctx.Event()
        results: multiprocessing.Queue[list[float]] = ctx.Queue()
        pinger = ctx.Process(target=ping, args=(b.bootstrap, done, results))
        pinger.start()
        time.sleep(2)  # the pinger process starts and connects
        started = time.monotonic()
        b.call(one_pass(b.broker), timeout=600)
        took = time.monotonic() - started
        time.sleep(0.2)
        done.set()
        rtts = results.get(timeout=30)
        pinger.join(30)
        after = b.run(b.broker.storage_used_bytes)
        print(
            f"maintenance pass {took:.2f}s, {size / 1e6:.0f} MB -> {after / 1e6:.0f} MB; "
            f"{len(rtts)} pings, max RTT {max(rtts) * 1000:.1f} ms, "
            f"p99 {sorted(rtts)[len(rtts) * 99 // 100] * 1000:.1f} ms, "
            f"median {sorted(rtts)[len(rtts) // 2] * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
