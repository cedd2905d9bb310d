"""Spans: broker spans with messaging attributes, joined to the producer's trace from record
headers, and one message followed from its producer span through the broker to its consumer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from tests.harness import BrokerThread, wait_until


def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind and s.name.startswith(prefix)]


def test_one_message_from_producer_through_broker_to_consumer(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor

    provider, exporter = tracing()
    with BrokerThread(tmp_path / "data", tracer_provider=provider, num_partitions=2) as b:
        b.run(b.broker.create_topic, "traced", 2, {})
        producer = ConfluentKafkaInstrumentor.instrument_producer(
            Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 0}), tracer_provider=provider
        )
        producer.produce(topic="traced", value=b"hello", key=b"k1", headers=[("app", b"x")])
        assert producer.flush(10) == 0

        consumer = ConfluentKafkaInstrumentor.instrument_consumer(
            Consumer(
                {"bootstrap.servers": b.bootstrap, "group.id": "g", "enable.auto.commit": False}
            ),
            tracer_provider=provider,
        )
        # The proxy forwards poll/consume/subscribe, not assign: assign on the wrapped consumer.
        consumer.original_consumer().assign([TopicPartition("traced", p, 0) for p in range(2)])
        message: Any = wait_until(lambda: consumer.poll(0.5), timeout=20)
        assert message.value() == b"hello"
        consumer.poll(0.2)  # the instrumentation ends the consumer span on the next poll
        consumer.close()
        wait_until(lambda: by_kind(exporter.get_finished_spans(), SpanKind.SERVER, "fetch"))

    spans = exporter.get_finished_spans()
    (send,) = by_kind(spans, SpanKind.PRODUCER, "traced send")
    (broker_produce,) = by_kind(spans, SpanKind.SERVER, "produce traced")
    (process,) = by_kind(spans, SpanKind.CONSUMER, "traced process")
    fetches = by_kind(spans, SpanKind.SERVER, "fetch traced")

    # producer → broker: the broker's span is a child of the producer's, in its trace
    assert broker_produce.parent is not None
    assert broker_produce.parent.span_id == send.context.span_id
    assert broker_produce.context.trace_id == send.context.trace_id
    attrs = broker_produce.attributes or {}
    assert attrs["messaging.system"] == "kafka"
    assert attrs["messaging.destination.name"] == "traced"
    assert attrs["messaging.batch.message_count"] == 1
    assert attrs["messaging.destination.partition.id"] == str(message.partition())
    assert attrs["messaging.kafka.offset"] == message.offset()

    # producer → consumer: the consumer's span links to the producer's context
    assert send.context.span_id in {link.context.span_id for link in process.links}
    # and the broker's fetch that handed the record out links to it too
    linked = {link.context.span_id for f in fetches for link in f.links}
    assert send.context.span_id in linked
    fetch_attrs = fetches[0].attributes or {}
    assert fetch_attrs["messaging.operation.name"] == "fetch"
    assert fetch_attrs["messaging.batch.message_count"] >= 1


def test_several_producer_contexts_become_links(tmp_path: Path) -> None:
    """A batch whose records came from different traces: the broker span links to each."""
    from kafka.protocol.producer import ProduceRequest
    from opentelemetry.trace import format_span_id, format_trace_id

    from streambus.records.batch import build_batch
    from tests.harness import RawClient

    provider, exporter = tracing()
    parents = [(0x1000 + i, 0x2000 + i) for i in range(3)]
    records = [
        (
            b"k",
            b"v",
            [("traceparent", f"00-{format_trace_id(t)}-{format_span_id(s)}-01".encode())],
            1,
        )
        for t, s in parents
    ]
    with BrokerThread(tmp_path / "data", tracer_provider=provider) as b:
        b.run(b.broker.create_topic, "multi", 1, {})
        TD = ProduceRequest.TopicProduceData
        request = ProduceRequest(
            transactional_id=None,
            acks=1,
            timeout_ms=1000,
            topic_data=[
                TD(
                    name="multi",
                    partition_data=[TD.PartitionProduceData(index=0, records=build_batch(records))],
                )
            ],
        )
        with RawClient(b.bootstrap) as client:
            assert client.request(request, 9).responses[0].partition_responses[0].error_code == 0
    (span,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER, "produce")
    assert span.parent is None
    assert {(link.context.trace_id, link.context.span_id) for link in span.links} == set(parents)


def test_sampler_is_honoured(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with BrokerThread(tmp_path / "data", tracer_provider=provider) as b:
        producer = Producer({"bootstrap.servers": b.bootstrap})
        producer.produce("unsampled", b"v")
        assert producer.flush(10) == 0
    assert exporter.get_finished_spans() == ()
