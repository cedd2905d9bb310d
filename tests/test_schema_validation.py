"""Broker-side schema validation against the broker's own schema registry, through its REST
API and real clients: a record without the magic byte, with an unknown id, with an id of
another subject, and (full mode) a payload that does not decode each get INVALID_RECORD naming
the record; the metrics count them; the good batches around them are stored.

The broker runs its registry with ``schema_registry_port``; schemas are registered with
``POST /subjects/{subject}/versions`` as any Confluent client does.
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest

from tests.harness import BrokerThread, RawClient, free_port, total

# The registry lives in streambus.schemas beside the validation; without it these skip.
HAS_REGISTRY = any(
    importlib.util.find_spec(f"streambus.schemas.{name}") is not None
    for name in ("registry", "rest", "api", "server")
)
pytestmark = pytest.mark.skipif(not HAS_REGISTRY, reason="the schema registry is not built yet")

USER = {
    "type": "record",
    "name": "User",
    "namespace": "com.example",
    "fields": [{"name": "name", "type": "string"}, {"name": "age", "type": "int"}],
}
OTHER = {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "long"}]}


def register(port: int, subject: str, schema: dict[str, Any]) -> int:
    body = json.dumps({"schema": json.dumps(schema)}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/subjects/{subject}/versions",
        data=body,
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["id"])


def wire(schema_id: int, payload: bytes = b"") -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload


def avro(value: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(USER), value)
    return out.getvalue()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[BrokerThread, int]]:
    port = free_port()
    with BrokerThread(
        tmp_path / "data", auto_create_topics_enable=False, schema_registry_port=port
    ) as b:
        b.run(
            b.broker.create_topic,
            "users",
            1,
            {
                "confluent.value.schema.validation": "true",
                "streambus.value.schema.validation.mode": "full",
            },
        )
        b.run(b.broker.create_topic, "ids", 1, {"confluent.value.schema.validation": "true"})
        yield b, port


def test_each_bad_record_is_named_and_the_good_batches_are_stored(
    broker: tuple[BrokerThread, int],
) -> None:
    from tests.test_schema_validation_checks import batch, produce, stored_values

    b, port = broker
    user_id = register(port, "users-value", USER)
    other_id = register(port, "other-value", OTHER)
    assert register(port, "ids-value", USER) == user_id  # the same schema keeps its id
    good = wire(user_id, avro({"name": "ada", "age": 36}))
    with RawClient(b.bootstrap) as client:
        answers = produce(
            client,
            {
                ("users", 0): batch(
                    good, b"plain", wire(999_999), wire(other_id), wire(user_id, b"\x09"), good
                ),
                ("ids", 0): batch(good, wire(user_id, b"\x09")),  # id mode: not decoded
            },
        )
        bad = answers[("users", 0)]
        assert bad.error_code == 87
        named = {e.batch_index: e.batch_index_error_message for e in bad.record_errors}
        assert sorted(named) == [1, 2, 3, 4]
        assert "magic byte" in named[1]
        assert "999999 is not registered" in named[2]
        assert "'users-value'" in named[3]
        assert f"does not decode with schema id {user_id}" in named[4]
        assert answers[("ids", 0)].error_code == 0
        after = produce(client, {("users", 0): batch(good)})[("users", 0)]
        assert (after.error_code, after.base_offset) == (0, 0)
        assert stored_values(client, "users") == [good]
        assert stored_values(client, "ids") == [good, wire(user_id, b"\x09")]
    samples = b.scrape()
    assert total(samples, "streambus_schema_validations_total", topic="users") == 7
    errors = {
        reason: total(
            samples, "streambus_schema_validation_errors_total", topic="users", reason=reason
        )
        for reason in (
            "missing_magic_byte",
            "unknown_schema_id",
            "subject_mismatch",
            "decode_failed",
        )
    }
    assert errors == dict.fromkeys(errors, 1.0)


def test_confluent_avro_serializer_through_a_validating_topic(
    broker: tuple[BrokerThread, int],
) -> None:
    from confluent_kafka import KafkaError, Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    b, port = broker
    registry = SchemaRegistryClient({"url": f"http://127.0.0.1:{port}"})
    serializer = AvroSerializer(registry, json.dumps(USER))
    producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 0})
    reports: list[Any] = []
    value = serializer(
        {"name": "ada", "age": 36}, SerializationContext("users", MessageField.VALUE)
    )
    for payload in (value, b"not the wire format"):
        producer.produce("users", payload, on_delivery=lambda err, _msg: reports.append(err))
        producer.flush(10)
    assert reports[0] is None
    assert reports[1] is not None
    assert reports[1].code() == KafkaError.INVALID_RECORD
