"""StreamBus observability example: an embedded broker, real Kafka traffic, and what it measured.

Steps (the seed's nine):
 1. build the metrics pipeline (OpenTelemetry SDK, Prometheus reader on a registry of its own)
 2. let the broker create its instruments (every metric of the catalogue it has a feature for)
 3. serve them at http://localhost:9090/metrics
 4. start an embedded broker on 127.0.0.1:9092 with a temporary data directory
 5. create a topic with 3 partitions
 6. produce 100 messages with confluent-kafka, instrumented by its OpenTelemetry contrib package
 7. consume them through a consumer group with an instrumented confluent-kafka consumer
 8. print a summary read back from the metrics pipeline, and the span tree of one message
 9. serve /metrics until Ctrl+C, then shut down and exit 0

Run it with ``make demo`` (which sets up .venv first) or
``.venv/bin/python examples/observability/main.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from streambus import Broker, BrokerConfig
from telemetry import Pipeline, TelemetryConfig, start_pipeline

TOPIC = "observability-demo"
log = logging.getLogger("example")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100, help="messages to produce (100)")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the topic (3)")
    parser.add_argument("--port", type=int, default=9092, help="broker port (9092)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="/metrics port (9090)")
    parser.add_argument(
        "--exit-after-summary", action="store_true", help="do not wait for Ctrl+C (for scripts)"
    )
    return parser.parse_args(argv)


# -- steps 6 and 7: real clients, instrumented by OpenTelemetry contrib ----------------------
def produce(bootstrap: str, count: int, provider: TracerProvider) -> list[tuple[int, int, bytes]]:
    producer = ConfluentKafkaInstrumentor.instrument_producer(
        Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log.connection.close": False}),
        tracer_provider=provider,
    )
    delivered: list[tuple[int, int, bytes]] = []
    failed: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(err)
        else:
            delivered.append((msg.partition(), msg.offset(), msg.key()))

    for i in range(count):
        producer.produce(
            topic=TOPIC,
            key=f"order-{i}".encode(),
            value=f'{{"order": {i}, "amount": {i * 3 % 97}}}'.encode(),
            headers=[("source", b"observability-example")],
            on_delivery=on_delivery,
        )
    if producer.flush(30) or failed:
        raise SystemExit(f"produce failed: {failed or 'messages left unsent'}")
    return delivered


GROUP = "observability-example"


def consume(
    bootstrap: str, expect: int, provider: TracerProvider
) -> tuple[Any, list[tuple[int, int, str]]]:
    """Read ``expect`` messages as a member of GROUP, committing as it goes.

    Returns the consumer, still a member of the group (so the summary shows it),
    and (partition, offset, traceparent header) of every message read.
    """
    consumer = ConfluentKafkaInstrumentor.instrument_consumer(
        Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": GROUP,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "log.connection.close": False,
            }
        ),
        tracer_provider=provider,
    )
    consumer.subscribe([TOPIC])
    got: list[tuple[int, int, str]] = []
    deadline = time.monotonic() + 30
    while len(got) < expect and time.monotonic() < deadline:
        for message in consumer.consume(100, 0.5):
            if message.error() is None:
                headers = dict(message.headers() or [])
                traceparent = (headers.get("traceparent") or b"").decode()
                got.append((message.partition(), message.offset(), traceparent))
        if got:
            consumer.commit(asynchronous=False)
    consumer.poll(0.1)  # the instrumentation ends the last batch's span on the next poll
    return consumer, got


# -- step 8: what the metrics pipeline measured --------------------------------------------
Samples = dict[str, list[tuple[dict[str, str], float]]]


def read_metrics(pipeline: Pipeline) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(pipeline.collect_prometheus_text()):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for lbls, v in samples.get(name, []) if labels.items() <= lbls.items())


def quantile(samples: Samples, name: str, q: float) -> float | None:
    """histogram_quantile over the buckets summed across series, as Prometheus computes it."""
    buckets: dict[float, float] = defaultdict(float)
    for labels, v in samples.get(name + "_bucket", []):
        buckets[float(labels["le"])] += v
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return None


def print_summary(samples: Samples) -> None:
    status = {0: "STOPPED", 1: "STARTING", 2: "RUNNING", 3: "STOPPING"}
    ms = 1000.0

    def lat(name: str) -> str:
        count = value(samples, name + "_count")
        if not count:
            return "no requests"
        mean = value(samples, name + "_sum") / count
        p95 = quantile(samples, name, 0.95) or 0.0
        p99 = quantile(samples, name, 0.99) or 0.0
        return (
            f"{count:.0f} requests, mean {mean * ms:.2f} ms, "
            f"p95 {p95 * ms:.2f} ms, p99 {p99 * ms:.2f} ms"
        )

    print("\n=== Metrics summary (read back from the OpenTelemetry pipeline) ===")
    print(
        f"Broker status:        {status.get(int(value(samples, 'streambus_broker_status')), '?')}"
    )
    print(f"Uptime:               {value(samples, 'streambus_broker_uptime_seconds'):.1f} s")
    print(f"Connections:          {value(samples, 'streambus_broker_connections'):.0f}")
    print(
        f"Topics / partitions:  {value(samples, 'streambus_topics_total'):.0f} / "
        f"{value(samples, 'streambus_partitions_total'):.0f}"
    )
    print(f"Messages produced:    {value(samples, 'streambus_messages_produced_total'):.0f}")
    print(f"Messages consumed:    {value(samples, 'streambus_messages_consumed_total'):.0f}")
    print(f"Messages stored:      {value(samples, 'streambus_messages_stored_total'):.0f}")
    print(
        f"Bytes produced:       {value(samples, 'streambus_bytes_produced_total'):.0f} "
        "(record key + value + header bytes)"
    )
    print(f"Bytes consumed:       {value(samples, 'streambus_bytes_consumed_total'):.0f}")
    print(f"Produce latency:      {lat('streambus_produce_latency_seconds')}")
    print(f"Consume latency:      {lat('streambus_consume_latency_seconds')}")
    print(f"Segments:             {value(samples, 'streambus_segments_total'):.0f}")
    used = value(samples, "streambus_storage_used_bytes")
    free = value(samples, "streambus_storage_available_bytes")
    print(
        f"Storage used:         {used:.0f} bytes "
        f"({used / max(used + free, 1) * 100:.6f} % of the filesystem)"
    )
    print(
        f"Network in / out:     {value(samples, 'streambus_network_bytes_in_total'):.0f} / "
        f"{value(samples, 'streambus_network_bytes_out_total'):.0f} bytes"
    )
    requests = defaultdict(float)
    for labels, v in samples.get("streambus_network_requests_total", []):
        requests[labels["api"]] += v
    print("Requests by API:      " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(requests.items())))
    print(f"Consumer groups:      {value(samples, 'streambus_consumer_groups_total'):.0f}")
    for labels, members in samples.get("streambus_consumer_group_members_total", []):
        group = labels["group"]
        lag = value(samples, "streambus_consumer_group_lag", group=group)
        print(f"  group {group}: {members:.0f} member(s), lag {lag:.0f} messages")
    print(f"Commit latency:       {lat('streambus_commit_latency_seconds')}")
    errors = defaultdict(float)
    for labels, v in samples.get("streambus_network_errors_total", []):
        errors[f"{labels['api']}/{labels['error']}"] += v
    listed = ", ".join(f"{k} {v:.0f}" for k, v in sorted(errors.items()))
    print(f"Errors returned:      {sum(errors.values()):.0f}" + (f" ({listed})" if listed else ""))


# -- step 8, continued: one message's trace ---------------------------------------------------
def describe(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    shown = {
        "messaging.destination.partition.id": "partition",
        "messaging.kafka.offset": "offset",
        "messaging.batch.message_count": "messages",
    }
    details = [f"{label}={attrs[key]}" for key, label in shown.items() if key in attrs]
    scope = span.instrumentation_scope.name if span.instrumentation_scope else "?"
    return (
        f"{span.name} [{span.kind.name}] {duration:.2f} ms {' '.join(details)} ({scope})".rstrip()
    )


def print_trace(
    spans: Iterable[ReadableSpan], partition: int, offset: int, traceparent: str
) -> None:
    """One message's spans: its producer span, and the broker and consumer spans joined to it.

    The message's ``traceparent`` header names its producer span. A broker span
    is that span's child when the request carried this one message's context,
    and links to it when the batch carried several (so do consumer spans).
    """
    spans = list(spans)
    try:
        _version, trace_hex, span_hex, _flags = traceparent.split("-")
        trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    except ValueError:
        print(f"\n(message {partition}/{offset} carries no traceparent header)")
        return
    print(f"\n=== Trace {trace_hex}: the message at partition {partition}, offset {offset} ===")
    root = next((s for s in spans if s.context.span_id == span_id), None)
    if root is None:
        print("(its producer span was not recorded)")
        return
    print(describe(root))
    joined = [
        (s, "child") for s in spans if s.parent is not None and s.parent.span_id == span_id
    ] + [
        (s, "link")
        for s in spans
        if any(
            link.context.span_id == span_id and link.context.trace_id == trace_id
            for link in s.links
        )
    ]
    for span, how in sorted(joined, key=lambda pair: pair[0].start_time or 0):
        marker = "└─" if how == "child" else "└┄"
        relation = "child of the producer span" if how == "child" else "linked to the producer span"
        print(f"{marker} {describe(span)}  ({relation})")


# -- steps 1-9 ------------------------------------------------------------------------------------
async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(
        "1-3. Metrics pipeline: OpenTelemetry SDK, Prometheus reader, "
        f"http://localhost:{args.metrics_port}/metrics"
    )
    pipeline = start_pipeline(TelemetryConfig(metrics_port=args.metrics_port, broker_id="1"))
    spans = InMemorySpanExporter()
    tracer_provider = pipeline.tracer_provider
    if not isinstance(tracer_provider, TracerProvider):
        raise SystemExit("this example needs the SDK tracer provider the pipeline builds")
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))

    with tempfile.TemporaryDirectory(prefix="streambus-example-") as data_dir:
        config = BrokerConfig.load(
            {
                "data_dir": Path(data_dir),
                "host": "127.0.0.1",
                "port": args.port,
            },
            env={},
        )
        broker = Broker(
            config, meter_provider=pipeline.meter_provider, tracer_provider=tracer_provider
        )
        await broker.start()
        print(f"4.   Broker {broker.broker_id} running on {broker.bootstrap} (data in {data_dir})")
        try:
            admin = AdminClient(
                {"bootstrap.servers": broker.bootstrap, "log.connection.close": False}
            )
            future = admin.create_topics([NewTopic(TOPIC, args.partitions, 1)])[TOPIC]
            await asyncio.to_thread(future.result, 15)
            del admin  # a live client would keep reconnecting once the broker stops
            print(f"5.   Topic {TOPIC!r} created with {args.partitions} partitions")

            delivered = await asyncio.to_thread(
                produce, broker.bootstrap, args.messages, tracer_provider
            )
            print(f"6.   Produced {len(delivered)} messages (confluent-kafka, instrumented)")
            consumer, consumed = await asyncio.to_thread(
                consume, broker.bootstrap, args.messages, tracer_provider
            )
            print(
                f"7.   Consumed {len(consumed)} messages in consumer group {GROUP!r} "
                "(confluent-kafka, instrumented)"
            )

            print_summary(read_metrics(pipeline))
            # the first message of a partition: the first record of its batch
            partition, offset, traceparent = min(consumed, key=lambda m: (m[1], m[0]))
            print_trace(spans.get_finished_spans(), partition, offset, traceparent)

            if not args.exit_after_summary:
                print(
                    f"\n9.   Serving http://localhost:{args.metrics_port}/metrics"
                    " — press Ctrl+C to stop"
                )
                sys.stdout.flush()
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
            await asyncio.to_thread(consumer.close)
        finally:
            await broker.stop()
            pipeline.shutdown()
    print("Broker stopped; bye.")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
