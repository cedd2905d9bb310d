"""Schema validation of produced records, against an in-memory schema source.

The checks themselves (``streambus.schemas.validation``) first, then a real broker whose
partition service is given the same in-memory source: real sockets, raw Produce v9 for the
exact ``record_errors``, a real scrape for the metrics. The same scenarios against the
registry's REST API are in ``test_schema_validation.py``.
"""

from __future__ import annotations

import io
import json
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import pytest
from kafka.protocol.producer import ProduceRequest

from streambus.errors import InvalidConfigError, InvalidRecordError
from streambus.records.batch import Record, build_batch, iter_records, walk_batches
from streambus.schemas.validation import (
    DECODE_FAILED,
    MISSING_MAGIC_BYTE,
    REGISTRY_DISABLED,
    SUBJECT_MISMATCH,
    UNKNOWN_SCHEMA_ID,
    SchemaValidation,
)
from streambus.topic_config import SchemaValidationMode, SubjectNameStrategy, TopicConfig
from tests.harness import BrokerThread, RawClient, fetch_request, total, wait_until

AVRO_USER = json.dumps(
    {
        "type": "record",
        "name": "User",
        "namespace": "com.example",
        "fields": [{"name": "name", "type": "string"}, {"name": "age", "type": "int"}],
    }
)
JSON_ORDER = json.dumps(
    {
        "title": "Order",
        "type": "object",
        "properties": {"id": {"type": "integer"}},
        "required": ["id"],
    }
)
PROTO = """
syntax = "proto3";
package shop.v1;
message Item {
  string sku = 1;
  int32 count = 2;
  message Price { int64 cents = 1; }
  Price price = 3;
}
message Basket { repeated Item items = 1; }
"""


@dataclass(frozen=True)
class Schema:
    schema_id: int
    schema_type: str
    schema: str
    references: tuple[Any, ...] = ()


@dataclass
class MemorySource:
    """What the registry answers, held in dicts; counts its lookups."""

    schemas: dict[int, Schema] = field(default_factory=dict)
    subjects: dict[str, set[int]] = field(default_factory=dict)
    lookups: int = 0

    def add(self, subject: str, schema: Schema) -> int:
        self.schemas[schema.schema_id] = schema
        self.subjects.setdefault(subject, set()).add(schema.schema_id)
        return schema.schema_id

    def schema_by_id(self, schema_id: int) -> Schema | None:
        self.lookups += 1
        return self.schemas.get(schema_id)

    def subject_has_id(self, subject: str, schema_id: int) -> bool:
        return schema_id in self.subjects.get(subject, set())


class Telemetry:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Counter[str]]] = []

    def schema_validated(self, topic: str, records: int, errors: Counter[str]) -> None:
        self.calls.append((topic, records, errors))


def wire(schema_id: int, payload: bytes = b"") -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload


def avro(value: dict[str, Any], schema: str = AVRO_USER) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(json.loads(schema)), value)
    return out.getvalue()


def rec(value: bytes | None, key: bytes | None = None) -> Record:
    return Record(0, 0, key, value, ())


def config(**overrides: str) -> TopicConfig:
    return TopicConfig().with_overrides({"confluent.value.schema.validation": "true", **overrides})


@pytest.fixture
def source() -> MemorySource:
    s = MemorySource()
    s.add("orders-value", Schema(1, "AVRO", AVRO_USER))
    s.add("other-value", Schema(2, "AVRO", AVRO_USER.replace("User", "Other")))
    return s


@pytest.fixture
def validation(source: MemorySource) -> SchemaValidation:
    v = SchemaValidation(Telemetry())
    v.source = source
    return v


# -- topic configs ------------------------------------------------------------------------
def test_configs_take_confluent_names_and_java_class_names() -> None:
    c = TopicConfig().with_overrides(
        {
            "confluent.key.schema.validation": "TRUE",
            "confluent.value.subject.name.strategy": (
                "io.confluent.kafka.serializers.subject.TopicRecordNameStrategy"
            ),
            "confluent.key.subject.name.strategy": "RecordNameStrategy",
            "streambus.value.schema.validation.mode": "full",
        }
    )
    assert c.confluent_key_schema_validation
    assert not c.confluent_value_schema_validation
    assert c.confluent_value_subject_name_strategy is SubjectNameStrategy.TOPIC_RECORD
    assert c.confluent_key_subject_name_strategy is SubjectNameStrategy.RECORD
    assert c.streambus_value_schema_validation_mode is SchemaValidationMode.FULL
    rendered = TopicConfig().to_kafka()
    assert rendered["confluent.value.subject.name.strategy"] == (
        "io.confluent.kafka.serializers.subject.TopicNameStrategy"
    )
    assert rendered["streambus.key.schema.validation.mode"] == "id"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("confluent.value.schema.validation", "yes"),
        ("confluent.value.subject.name.strategy", "SubjectStrategy"),
        ("confluent.key.subject.name.strategy", "io.confluent.Other.TopicNameStrategyX"),
        ("streambus.value.schema.validation.mode", "strict"),
    ],
)
def test_bad_config_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(InvalidConfigError, match=key.replace(".", r"\.")):
        TopicConfig().with_overrides({key: value})


# -- id mode ------------------------------------------------------------------------------
def test_id_mode_names_each_failing_record(validation: SchemaValidation) -> None:
    records = [
        rec(wire(1, b"anything: id mode reads 5 bytes")),
        rec(b'{"no": "magic"}'),
        rec(b"\x00\x00\x01"),  # too short for an id
        rec(wire(99)),
        rec(wire(2)),  # registered, but under other-value
        rec(None),  # a tombstone carries no schema
    ]
    verdict = validation.check_records("orders", config(), records)
    assert verdict.records == 6
    assert [(i, reason) for i, reason, _ in verdict.failures] == [
        (1, MISSING_MAGIC_BYTE),
        (2, MISSING_MAGIC_BYTE),
        (3, UNKNOWN_SCHEMA_ID),
        (4, SUBJECT_MISMATCH),
    ]
    assert "schema id 99 is not registered" in verdict.failures[2][2]
    assert "'orders-value'" in verdict.failures[3][2]
    error = verdict.error()
    assert isinstance(error, InvalidRecordError)
    assert error.errno == 87
    assert [i for i, _ in error.record_errors] == [1, 2, 3, 4]
    assert "4 of 6 record(s) failed schema validation" in str(error)


def test_key_validation_checks_keys_under_the_key_subject(
    validation: SchemaValidation, source: MemorySource
) -> None:
    source.add("orders-key", Schema(3, "AVRO", '"string"'))
    c = TopicConfig().with_overrides({"confluent.key.schema.validation": "true"})
    verdict = validation.check_records(
        "orders", c, [rec(b"raw value", key=wire(3)), rec(b"v", key=wire(1)), rec(b"v")]
    )
    assert [(i, reason) for i, reason, _ in verdict.failures] == [(1, SUBJECT_MISMATCH)]
    assert verdict.failures[0][2].startswith("key schema id 1")


def test_repeated_ids_are_looked_up_once_per_batch(
    validation: SchemaValidation, source: MemorySource
) -> None:
    verdict = validation.check_records("orders", config(), [rec(wire(1))] * 500)
    assert verdict.failures == ()
    assert source.lookups == 1


def test_without_a_registry_every_record_is_refused() -> None:
    validation = SchemaValidation(Telemetry())
    verdict = validation.check_records("orders", config(), [rec(wire(1)), rec(None)])
    assert [(i, reason) for i, reason, _ in verdict.failures] == [(0, REGISTRY_DISABLED)]
    assert "schema registry disabled" in verdict.failures[0][2]


@pytest.mark.parametrize(
    ("strategy", "subject"),
    [
        ("RecordNameStrategy", "com.example.User"),
        ("TopicRecordNameStrategy", "orders-com.example.User"),
    ],
)
def test_record_name_strategies_use_the_schemas_name(
    validation: SchemaValidation, source: MemorySource, strategy: str, subject: str
) -> None:
    c = config(**{"confluent.value.subject.name.strategy": strategy})
    assert validation.check_records("orders", c, [rec(wire(1))]).failures[0][1] == (
        SUBJECT_MISMATCH
    )
    source.add(subject, source.schemas[1])
    assert validation.check_records("orders", c, [rec(wire(1))]).failures == ()


@pytest.mark.parametrize(
    ("schema", "name"),
    [
        (Schema(10, "JSON", JSON_ORDER), "Order"),
        (Schema(11, "PROTOBUF", PROTO), "shop.v1.Item"),
        (Schema(12, "AVRO", AVRO_USER.replace('"com.example"', '""')), "User"),
    ],
)
def test_record_names_of_each_format(
    validation: SchemaValidation, source: MemorySource, schema: Schema, name: str
) -> None:
    source.add(name, schema)
    c = config(**{"confluent.value.subject.name.strategy": "RecordNameStrategy"})
    assert validation.check_records("t", c, [rec(wire(schema.schema_id))]).failures == ()


def test_a_schema_without_a_name_has_no_record_subject(
    validation: SchemaValidation, source: MemorySource
) -> None:
    source.add("x", Schema(20, "AVRO", '"string"'))
    c = config(**{"confluent.value.subject.name.strategy": "RecordNameStrategy"})
    failure = validation.check_records("t", c, [rec(wire(20))]).failures[0]
    assert failure[1] == SUBJECT_MISMATCH
    assert "no record name" in failure[2]


# -- full mode ----------------------------------------------------------------------------
FULL = {"streambus.value.schema.validation.mode": "full"}


def test_full_mode_avro(validation: SchemaValidation) -> None:
    good = wire(1, avro({"name": "ada", "age": 36}))
    verdict = validation.check_records(
        "orders",
        config(**FULL),
        [rec(good), rec(good[:-3]), rec(good + b"\x02"), rec(wire(1, b"\x07abc"))],
    )
    assert [(i, reason) for i, reason, _ in verdict.failures] == [
        (1, DECODE_FAILED),
        (2, DECODE_FAILED),
        (3, DECODE_FAILED),
    ]
    assert "1 byte(s) left after the record" in verdict.failures[1][2]
    assert verdict.failures[0][2].startswith("value does not decode with schema id 1")
    # id mode takes all of them: it reads only the first 5 bytes
    assert validation.check_records("orders", config(), [rec(good[:-3])]).failures == ()


def test_full_mode_json(validation: SchemaValidation, source: MemorySource) -> None:
    source.add("orders-value", Schema(10, "JSON", JSON_ORDER))
    verdict = validation.check_records(
        "orders",
        config(**FULL),
        [rec(wire(10, b'{"id": 7}')), rec(wire(10, b"{not json")), rec(wire(10, b'{"id": "x"}'))],
    )
    assert [(i, reason) for i, reason, _ in verdict.failures] == [
        (1, DECODE_FAILED),
        (2, DECODE_FAILED),
    ]
    assert "not JSON" in verdict.failures[0][2]
    assert "'x' is not of type 'integer'" in verdict.failures[1][2]


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pb_field(number: int, wire_type: int, body: bytes) -> bytes:
    tag = _pb_varint(number << 3 | wire_type)
    if wire_type == 2:
        return tag + _pb_varint(len(body)) + body
    return tag + body


def test_full_mode_protobuf(validation: SchemaValidation, source: MemorySource) -> None:
    source.add("orders-value", Schema(11, "PROTOBUF", PROTO))
    price = _pb_field(1, 0, _pb_varint(250))
    item = _pb_field(1, 2, b"sku-1") + _pb_field(2, 0, b"\x03") + _pb_field(3, 2, price)
    first = b"\x00"  # message indexes [0]: Item
    basket = b"\x02\x02"  # count 1, index 1: Basket
    nested = b"\x04\x00\x00"  # count 2, [0, 0]: Item.Price
    cases = [
        wire(11, first + item),
        wire(11, basket + _pb_field(1, 2, item)),
        wire(11, nested + price),
        wire(11, b"\x02\x06" + item),  # index 3: no such message
        wire(11, first + item[:-1]),  # the nested price runs past the end
        wire(11, first + b"\x0f\x01"),  # wire type 7
        wire(11, first + _pb_field(1, 2, b"\xff\xfe")),  # a proto3 string, not UTF-8
        wire(11, basket + _pb_field(1, 2, _pb_field(3, 2, b"\x08"))),  # bad depth-2 Price
    ]
    verdict = validation.check_records("orders", config(**FULL), [rec(c) for c in cases])
    assert [(i, reason) for i, reason, _ in verdict.failures] == [
        (3, DECODE_FAILED),
        (4, DECODE_FAILED),
        (5, DECODE_FAILED),
        (6, DECODE_FAILED),
        (7, DECODE_FAILED),
    ]
    messages = [m for _, _, m in verdict.failures]
    assert "name no message of the schema" in messages[0]
    assert "invalid wire type 7" in messages[2]
    assert "not UTF-8" in messages[3]


def test_full_mode_skips_decoding_schemas_with_references(
    validation: SchemaValidation, source: MemorySource
) -> None:
    source.add("orders-value", Schema(30, "AVRO", AVRO_USER, references=("ref",)))
    verdict = validation.check_records("orders", config(**FULL), [rec(wire(30, b"junk"))])
    assert verdict.failures == ()


def test_parsed_schemas_are_cached_in_a_bounded_lru(source: MemorySource) -> None:
    validation = SchemaValidation(Telemetry(), cache_size=2)
    for i in (40, 41, 42):
        source.add("t-value", Schema(i, "AVRO", AVRO_USER))
    first = validation.parsed(source.schemas[40])
    assert validation.parsed(source.schemas[40]) is first
    validation.parsed(source.schemas[41])
    validation.parsed(source.schemas[42])  # evicts 40, the least recently used
    assert validation.parsed(source.schemas[40]) is not first
    # a different text under the same id (a registry restored elsewhere) is parsed again
    changed = Schema(41, "JSON", JSON_ORDER)
    parsed = validation.parsed(changed)
    assert not isinstance(parsed, str)
    assert parsed.schema_type == "JSON"


# -- the produce path's check of a whole batch -------------------------------------------
async def test_check_counts_once_per_batch_and_raises_naming_records(
    source: MemorySource,
) -> None:
    telemetry = Telemetry()
    validation = SchemaValidation(telemetry)
    validation.source = source
    batch = build_batch(
        [(None, v, [], 1) for v in (wire(1), b"plain", wire(99), wire(1), b"")],
    )
    with pytest.raises(InvalidRecordError) as caught:
        await validation.check("orders", batch, config(), off_loop=False)
    assert [i for i, _ in caught.value.record_errors] == [1, 2, 4]
    assert telemetry.calls == [
        ("orders", 5, Counter({MISSING_MAGIC_BYTE: 2, UNKNOWN_SCHEMA_ID: 1}))
    ]
    good = build_batch([(None, wire(1), [], 1)] * 3)
    payload = await validation.check("orders", good, config(), off_loop=True)
    assert payload == 3 * 5
    assert telemetry.calls[-1] == ("orders", 3, Counter())


# -- through a real broker ----------------------------------------------------------------
TD = ProduceRequest.TopicProduceData
PD = TD.PartitionProduceData


def produce(client: RawClient, batches: dict[tuple[str, int], bytes]) -> dict[tuple[str, int], Any]:
    by_topic: dict[str, list[Any]] = {}
    for (topic, partition), records in batches.items():
        by_topic.setdefault(topic, []).append(PD(index=partition, records=records))
    request = ProduceRequest(
        transactional_id=None,
        acks=-1,
        timeout_ms=5000,
        topic_data=[TD(name=t, partition_data=p) for t, p in by_topic.items()],
    )
    response = client.request(request, 9)
    return {(t.name, p.index): p for t in response.responses for p in t.partition_responses}


def stored_values(client: RawClient, topic: str, partition: int = 0) -> list[bytes | None]:
    response = client.request(fetch_request(topic, partition), 12)
    data = bytes(response.responses[0].partitions[0].records or b"")
    return [r.value for pos, h in walk_batches(data) for r in iter_records(data, pos, h)]


@pytest.fixture
def broker(tmp_path: Path, source: MemorySource) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path / "data", auto_create_topics_enable=False) as b:
        b.broker.partitions.schema_validation.source = source
        b.run(b.broker.create_topic, "orders", 2, {"confluent.value.schema.validation": "true"})
        b.run(b.broker.create_topic, "plain", 1, {})
        yield b


def batch(*values: bytes | None) -> bytes:
    return build_batch([(None, v, [], 1_700_000_000_000) for v in values])


def test_broker_refuses_a_failing_batch_and_stores_the_others(broker: BrokerThread) -> None:
    good = wire(1, avro({"name": "ada", "age": 36}))
    with RawClient(broker.bootstrap) as client:
        answers = produce(
            client,
            {
                ("orders", 0): batch(good, b"no magic", wire(99), wire(2), good),
                ("orders", 1): batch(good, None),
                ("plain", 0): batch(b"no magic", b"anything"),
            },
        )
        bad = answers[("orders", 0)]
        assert bad.error_code == 87
        assert [(e.batch_index, e.batch_index_error_message) for e in bad.record_errors] == [
            (1, "value does not start with magic byte 0 and a 4-byte schema id"),
            (2, "value schema id 99 is not registered"),
            (3, "value schema id 2 is not registered under subject 'orders-value'"),
        ]
        assert "3 of 5 record(s) failed schema validation" in bad.error_message
        assert answers[("orders", 1)].error_code == 0
        assert answers[("plain", 0)].error_code == 0
        # nothing of the refused batch is stored; the next good one lands at offset 0
        again = produce(client, {("orders", 0): batch(good)})[("orders", 0)]
        assert (again.error_code, again.base_offset) == (0, 0)
        assert stored_values(client, "orders", 0) == [good]
        assert stored_values(client, "orders", 1) == [good, None]
        assert stored_values(client, "plain", 0) == [b"no magic", b"anything"]

    def counted() -> dict[str, float]:
        samples = broker.scrape()
        return {
            "orders": total(samples, "streambus_schema_validations_total", topic="orders"),
            "plain": total(samples, "streambus_schema_validations_total", topic="plain"),
            "magic": total(
                samples,
                "streambus_schema_validation_errors_total",
                topic="orders",
                reason=MISSING_MAGIC_BYTE,
            ),
            "unknown": total(
                samples,
                "streambus_schema_validation_errors_total",
                topic="orders",
                reason=UNKNOWN_SCHEMA_ID,
            ),
            "subject": total(
                samples,
                "streambus_schema_validation_errors_total",
                topic="orders",
                reason=SUBJECT_MISMATCH,
            ),
        }

    expected = {"orders": 8.0, "plain": 0.0, "magic": 1.0, "unknown": 1.0, "subject": 1.0}
    assert wait_until(lambda: counted() == expected), counted()


def test_broker_full_mode_through_confluent_kafka(broker: BrokerThread) -> None:
    from confluent_kafka import KafkaError, Producer

    broker.run(
        broker.broker.create_topic,
        "users",
        1,
        {"confluent.value.schema.validation": "true", **FULL},
    )
    broker.broker.partitions.schema_validation.source.add(  # type: ignore[union-attr]
        "users-value", Schema(1, "AVRO", AVRO_USER)
    )
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "enable.idempotence": False}
    )
    reports: list[tuple[bytes, Any]] = []
    good = wire(1, avro({"name": "ada", "age": 36}))
    for value in (good, wire(1, b"\x09")):
        producer.produce(
            "users", value, on_delivery=lambda err, msg: reports.append((msg.value(), err))
        )
        producer.flush(10)
    assert reports[0] == (good, None)
    err = reports[1][1]
    assert err is not None
    assert err.code() == KafkaError.INVALID_RECORD
    assert not err.retriable()
    with RawClient(broker.bootstrap) as client:
        assert stored_values(client, "users") == [good]
    samples = broker.scrape()
    assert (
        total(
            samples, "streambus_schema_validation_errors_total", topic="users", reason=DECODE_FAILED
        )
        == 1
    )


async def test_check_reads_keys_and_full_values_of_a_batch(source: MemorySource) -> None:
    """The produce path's own record walk: keys by their 5-byte header, values whole."""
    source.add("orders-key", Schema(3, "AVRO", '"string"'))
    validation = SchemaValidation(Telemetry())
    validation.source = source
    c = config(
        **{"confluent.key.schema.validation": "true", **FULL},
    )
    good = wire(1, avro({"name": "ada", "age": 36}))
    records = [
        (wire(3, b"\x02k" + b"!" * 300), good, [("h", b"v")], 1),  # a long key: id only
        (None, good, [], 2),
        (wire(1), good, [], 3),  # a key of the value's subject
        (wire(3), good[:-1], [], 4),  # a value cut short
    ]
    with pytest.raises(InvalidRecordError) as caught:
        await validation.check("orders", build_batch(records), c, off_loop=False)
    assert [i for i, _ in caught.value.record_errors] == [2, 3]
    assert caught.value.record_errors[0][1].startswith("key schema id 1")
    assert "does not decode" in caught.value.record_errors[1][1]
