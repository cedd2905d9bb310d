"""The schema registry's REST API, driven by Confluent's own client and serializers and by
raw HTTP, against a real broker; metrics read from a real scrape."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.harness import BrokerThread, free_port, total

CT = "application/vnd.schemaregistry.v1+json"

AVRO_V1 = json.dumps(
    {
        "type": "record",
        "name": "Reading",
        "namespace": "test",
        "fields": [{"name": "sensor", "type": "string"}, {"name": "value", "type": "double"}],
    }
)
JSON_V1 = json.dumps(
    {
        "type": "object",
        "properties": {"sensor": {"type": "string"}, "value": {"type": "number"}},
        "required": ["sensor"],
    }
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path_factory.mktemp("sr"), schema_registry_port=free_port(), num_partitions=1
    ) as b:
        yield b


def url(broker: BrokerThread) -> str:
    return f"http://127.0.0.1:{broker.broker.schema_registry_port}"


@pytest.fixture
def http(broker: BrokerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url(broker), headers={"Content-Type": CT}, timeout=30) as client:
        yield client


def produce_and_read(broker: BrokerThread, topic: str, values: list[bytes]) -> list[bytes]:
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"g-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    out: list[bytes] = []
    try:
        for _ in range(200):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg.value())
                if len(out) == len(values):
                    break
    finally:
        consumer.close()
    return out


def reading_class() -> Any:
    """A protobuf message class built at run time from a FileDescriptorProto (no protoc)."""
    fd = descriptor_pb2.FileDescriptorProto(
        name="streambus_test_reading.proto", package="sbtest", syntax="proto3"
    )
    message = fd.message_type.add(name="Reading")
    f = descriptor_pb2.FieldDescriptorProto
    message.field.add(name="sensor", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    message.field.add(name="value", number=2, type=f.TYPE_DOUBLE, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sbtest.Reading"))


def test_confluent_serializers_round_trip_through_streambus(broker: BrokerThread) -> None:
    with SchemaRegistryClient({"url": url(broker)}) as client:
        round_trip(broker, client)


def round_trip(broker: BrokerThread, client: SchemaRegistryClient) -> None:
    readings = [{"sensor": f"s{i}", "value": i / 2} for i in range(5)]
    Reading = reading_class()
    cases: list[tuple[str, Any, Any, list[Any]]] = [
        (
            "avro",
            AvroSerializer(client, AVRO_V1),
            AvroDeserializer(client),
            readings,
        ),
        (
            "json",
            JSONSerializer(JSON_V1, client),
            JSONDeserializer(JSON_V1, schema_registry_client=client),
            readings,
        ),
        (
            "protobuf",
            ProtobufSerializer(Reading, client),
            ProtobufDeserializer(Reading),
            [Reading(sensor=r["sensor"], value=r["value"]) for r in readings],
        ),
    ]
    for name, serializer, deserializer, objects in cases:
        topic = f"readings-{name}"
        ctx = SerializationContext(topic, MessageField.VALUE)
        values = [serializer(obj, ctx) for obj in objects]
        assert all(v[0] == 0 for v in values)  # Confluent's wire format: magic byte 0, id
        stored = produce_and_read(broker, topic, values)
        assert [deserializer(v, ctx) for v in stored] == objects, name
        latest = client.get_latest_version(f"{topic}-value")
        assert latest.version == 1
        assert latest.schema.schema_type == {"avro": "AVRO", "json": "JSON"}.get(name, "PROTOBUF")
        registered = broker.broker.schemas.schema_by_id(latest.schema_id)
        assert registered is not None
        assert broker.broker.schemas.subject_has_id(f"{topic}-value", latest.schema_id)
        assert not broker.broker.schemas.subject_has_id("nothing-value", latest.schema_id)


def test_same_schema_under_two_subjects_shares_one_id(http: httpx.Client) -> None:
    body = {"schema": AVRO_V1.replace("Reading", "Shared")}
    first = http.post("/subjects/shared-a/versions", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"].startswith(CT)
    # whitespace does not make a new schema; the same subject answers the same id, no version
    spaced = {"schema": json.dumps(json.loads(body["schema"]), indent=4)}
    assert http.post("/subjects/shared-a/versions", json=spaced).json() == first.json()
    second = http.post("/subjects/shared-b/versions", json=body)
    assert second.json() == first.json()
    schema_id = first.json()["id"]
    assert http.get("/subjects/shared-a/versions").json() == [1]
    assert http.get(f"/schemas/ids/{schema_id}/subjects").json() == ["shared-a", "shared-b"]
    assert http.get(f"/schemas/ids/{schema_id}/versions").json() == [
        {"subject": "shared-a", "version": 1},
        {"subject": "shared-b", "version": 1},
    ]
    assert json.loads(http.get(f"/schemas/ids/{schema_id}/schema").text) == json.loads(
        body["schema"]
    )
    got = http.get("/subjects/shared-b/versions/latest").json()
    assert got == {"subject": "shared-b", "version": 1, "id": schema_id, "schema": body["schema"]}
    found = http.post("/subjects/shared-b", json=spaced).json()
    assert (found["id"], found["version"]) == (schema_id, 1)
    assert http.get("/schemas/types").json() == ["JSON", "PROTOBUF", "AVRO"]


def test_normalize_stores_a_canonical_form(http: httpx.Client) -> None:
    a = {"type": "record", "name": "N", "fields": [{"name": "x", "type": "int"}]}
    b = {"fields": [{"type": "int", "name": "x"}], "name": "N", "type": "record"}
    one = http.post("/subjects/norm/versions?normalize=true", json={"schema": json.dumps(a)})
    two = http.post("/subjects/norm/versions?normalize=true", json={"schema": json.dumps(b)})
    assert one.json() == two.json()
    assert http.get("/subjects/norm/versions").json() == [1]


def test_references(http: httpx.Client) -> None:
    address = {
        "type": "record",
        "name": "Address",
        "namespace": "ref",
        "fields": [{"name": "city", "type": "string"}],
    }
    assert http.post("/subjects/address/versions", json={"schema": json.dumps(address)}).is_success
    person = {
        "type": "record",
        "name": "Person",
        "namespace": "ref",
        "fields": [{"name": "home", "type": "ref.Address"}],
    }
    refs = [{"name": "ref.Address", "subject": "address", "version": 1}]
    answer = http.post(
        "/subjects/person/versions", json={"schema": json.dumps(person), "references": refs}
    )
    assert answer.status_code == 200, answer.text
    got = http.get(f"/schemas/ids/{answer.json()['id']}").json()
    assert got["references"] == refs
    assert http.get("/subjects/address/versions/1/referencedby").json() == [answer.json()["id"]]
    missing = [{"name": "ref.Address", "subject": "nowhere", "version": 1}]
    bad = http.post(
        "/subjects/person2/versions", json={"schema": json.dumps(person), "references": missing}
    )
    assert (bad.status_code, bad.json()["error_code"]) == (422, 42201)


def test_soft_and_hard_delete(http: httpx.Client) -> None:
    for field in ("a", "b"):
        schema = {
            "type": "record",
            "name": "D",
            "fields": [{"name": field, "type": "int", "default": 0}],
        }
        assert http.post("/subjects/del/versions", json={"schema": json.dumps(schema)}).is_success
    assert http.get("/subjects/del/versions").json() == [1, 2]
    hard_first = http.delete("/subjects/del/versions/1?permanent=true")
    assert hard_first.json()["error_code"] == 40407
    assert http.delete("/subjects/del/versions/1").json() == 1
    assert http.delete("/subjects/del/versions/1").json()["error_code"] == 40406
    assert http.get("/subjects/del/versions").json() == [2]
    assert http.get("/subjects/del/versions?deleted=true").json() == [1, 2]
    assert http.get("/subjects/del/versions/1").json()["error_code"] == 40402
    assert http.get("/subjects/del/versions/1?deleted=true").json()["version"] == 1
    deleted_id = http.get("/subjects/del/versions/1?deleted=true").json()["id"]
    assert http.delete("/subjects/del/versions/1?permanent=true").json() == 1
    assert http.get("/subjects/del/versions?deleted=true").json() == [2]
    assert http.get(f"/schemas/ids/{deleted_id}").json()["error_code"] == 40403
    assert http.delete("/subjects/del?permanent=true").json()["error_code"] == 40405
    assert http.delete("/subjects/del").json() == [2]
    assert "del" not in http.get("/subjects").json()
    assert "del" in http.get("/subjects?deleted=true").json()
    assert http.get("/subjects/del/versions").json()["error_code"] == 40401
    assert http.delete("/subjects/del").json()["error_code"] == 40404
    assert http.delete("/subjects/del?permanent=true").json() == [2]
    assert "del" not in http.get("/subjects?deleted=true").json()


def test_config_and_mode(http: httpx.Client) -> None:
    assert http.get("/config").json() == {"compatibilityLevel": "BACKWARD"}
    missing = http.get("/config/cfg")
    assert (missing.status_code, missing.json()["error_code"]) == (404, 40408)
    assert http.get("/config/cfg?defaultToGlobal=true").json() == {"compatibilityLevel": "BACKWARD"}
    assert http.put("/config/cfg", json={"compatibility": "full"}).json() == {
        "compatibility": "FULL"
    }
    assert http.get("/config/cfg").json() == {"compatibilityLevel": "FULL"}
    for level in ("SIDEWAYS", None, 3):
        bad = http.put("/config/cfg", json={"compatibility": level})
        assert (bad.status_code, bad.json()["error_code"]) == (422, 42203), level
    assert http.delete("/config/cfg").json() == {"compatibilityLevel": "FULL"}
    assert http.get("/config/cfg").status_code == 404
    assert http.get("/mode").json() == {"mode": "READWRITE"}
    assert http.put("/mode/ro", json={"mode": "READONLY"}).json() == {"mode": "READONLY"}
    refused = http.post("/subjects/ro/versions", json={"schema": '"string"'})
    assert (refused.status_code, refused.json()["error_code"]) == (422, 42205)
    assert http.put("/mode/ro", json={"mode": "READWRITE"}).is_success
    assert http.post("/subjects/ro/versions", json={"schema": '"string"'}).is_success


def test_bad_input_gets_confluent_codes_and_kafka_is_still_served(
    broker: BrokerThread, http: httpx.Client
) -> None:
    malformed = http.post("/subjects/bad/versions", content=b'{"schema": ')
    assert (malformed.status_code, malformed.json()["error_code"]) == (422, 422)
    invalid = http.post("/subjects/bad/versions", json={"schema": '{"type": "record"}'})
    assert (invalid.status_code, invalid.json()["error_code"]) == (422, 42201)
    not_json = http.post("/subjects/bad/versions", json={"schema": "{nope", "schemaType": "JSON"})
    assert not_json.json()["error_code"] == 42201
    bad_proto = http.post(
        "/subjects/bad/versions",
        json={"schema": 'syntax = "proto3"; message A { int32 x = 1 ', "schemaType": "PROTOBUF"},
    )
    assert bad_proto.json()["error_code"] == 42201
    assert http.post("/subjects/ok/versions", json={"schema": '"int"'}).is_success
    for version in ("0", "abc", "-5"):
        answer = http.get(f"/subjects/ok/versions/{version}")
        assert (answer.status_code, answer.json()["error_code"]) == (422, 42202), version
    unknown = http.get("/subjects/ok/versions/7")
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, 40402)
    assert http.get("/subjects/none/versions/1").json()["error_code"] == 40401
    assert http.get("/schemas/ids/999999").json()["error_code"] == 40403
    huge = http.post(
        "/subjects/bad/versions", content=b'{"schema": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    )
    assert (huge.status_code, huge.json()["error_code"]) == (413, 413)
    # the broker still serves Kafka clients
    assert produce_and_read(broker, "after-bad-input", [b"still here"]) == [b"still here"]


def test_metrics_from_a_real_scrape(broker: BrokerThread, http: httpx.Client) -> None:
    before = broker.scrape()
    schema = json.dumps({"type": "record", "name": "M", "fields": [{"name": "x", "type": "int"}]})
    assert http.post("/subjects/metrics-a/versions", json={"schema": schema}).is_success
    assert http.post("/subjects/metrics-a/versions", json={"schema": schema}).is_success  # again
    assert http.post("/subjects/metrics-b/versions", json={"schema": schema}).is_success
    assert http.get("/subjects/metrics-a/versions/9").status_code == 404
    after = broker.scrape()

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # two new versions (the repeat registered nothing), one new schema id, two new subjects
    assert delta("streambus_schemas_registered_total", type="AVRO") == 2
    assert delta("streambus_schemas") == 1
    assert delta("streambus_schema_subjects") == 2
    route = "/subjects/{subject}/versions"
    assert delta("streambus_schema_registry_requests_total", route=route, status="200") == 3
    assert (
        delta(
            "streambus_schema_registry_requests_total",
            route="/subjects/{subject}/versions/{version}",
            status="404",
        )
        == 1
    )
    assert delta("streambus_schema_registry_request_duration_seconds_count", route=route) == 3
    assert total(after, "streambus_schemas") == broker.broker.schemas.schema_count()


def test_rest_requests_are_server_spans_named_by_route(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        BrokerThread(
            tmp_path, tracer_provider=provider, schema_registry_port=free_port(), metrics=False
        ) as b,
        httpx.Client(base_url=url(b), timeout=30) as http,
    ):
        assert http.post("/subjects/traced/versions", json={"schema": '"int"'}).is_success
        assert http.get("/subjects/traced/versions/5").status_code == 404
    spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    by_name = {s.name: s for s in spans}
    post = by_name["POST /subjects/{subject}/versions"]
    assert post.attributes is not None
    assert post.attributes["http.route"] == "/subjects/{subject}/versions"
    assert post.attributes["http.response.status_code"] == 200
    get = by_name["GET /subjects/{subject}/versions/{version}"]
    assert get.attributes is not None
    assert get.attributes["http.response.status_code"] == 404
    provider.shutdown()


def test_concurrent_registrations_on_a_fresh_registry_get_distinct_versions(
    tmp_path: Path,
) -> None:
    count = 12
    # pairwise backward compatible: each adds its own field with a default
    schemas = [
        json.dumps(
            {
                "type": "record",
                "name": "C",
                "fields": [
                    {"name": "x", "type": "int"},
                    {"name": f"f{i}", "type": "int", "default": 0},
                ],
            }
        )
        for i in range(count)
    ]
    with (
        BrokerThread(tmp_path, schema_registry_port=free_port(), metrics=False) as b,
        httpx.Client(base_url=url(b), timeout=30) as http,
    ):
        # the first writes race the creation of _schemas
        def register(schema: str) -> int:
            answer = http.post("/subjects/race/versions", json={"schema": schema})
            assert answer.status_code == 200, answer.text
            return int(answer.json()["id"])

        with ThreadPoolExecutor(count) as pool:
            ids = list(pool.map(register, schemas))
        assert len(set(ids)) == count
        versions = [http.get(f"/subjects/race/versions/{v}").json() for v in range(1, count + 1)]
        assert sorted(v["id"] for v in versions) == sorted(ids)


def test_schemas_topic_holds_confluents_layout(tmp_path: Path) -> None:
    with (
        BrokerThread(tmp_path, schema_registry_port=free_port(), metrics=False) as b,
        httpx.Client(base_url=url(b), timeout=30) as http,
    ):
        schema_id = http.post("/subjects/lay/versions", json={"schema": '"string"'}).json()["id"]
        assert http.put("/config/lay", json={"compatibility": "FULL"}).is_success
        assert http.delete("/subjects/lay").is_success
        assert http.delete("/subjects/lay?permanent=true").is_success
        consumer = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": "layout",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe(["_schemas"])
        records: list[tuple[bytes, bytes | None]] = []
        try:
            for _ in range(100):
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    records.append((msg.key(), msg.value()))
                    if len(records) == 6:
                        break
        finally:
            consumer.close()
    key = b'{"keytype":"SCHEMA","subject":"lay","version":1,"magic":1}'
    value = {
        "subject": "lay",
        "version": 1,
        "id": schema_id,
        "schemaType": "AVRO",
        "schema": '"string"',
        "references": [],
        "deleted": False,
    }
    config_key = b'{"keytype":"CONFIG","subject":"lay","magic":0}'
    assert (
        records
        == [
            (key, json.dumps(value, separators=(",", ":")).encode()),
            (config_key, b'{"compatibilityLevel":"FULL"}'),
            (key, json.dumps({**value, "deleted": True}, separators=(",", ":")).encode()),
            (
                b'{"keytype":"DELETE_SUBJECT","subject":"lay","magic":0}',
                b'{"subject":"lay","version":1}',
            ),
            (key, None),  # the permanent delete: a tombstone
            (config_key, None),
        ][: len(records)]
    )
    assert len(records) == 6


def test_protobuf_text_schema_is_served_serialized_to_confluents_deserializer(
    broker: BrokerThread, http: httpx.Client
) -> None:
    text = (
        'syntax = "proto3";\npackage sbtext;\n'
        "message Order {\n  string id = 1;\n  repeated Line lines = 2;\n"
        "  map<string, int32> tags = 3;\n  Kind kind = 4;\n"
        "  enum Kind {\n    NONE = 0;\n    RUSH = 1;\n  }\n}\n"
        "message Line {\n  string sku = 1;\n  int64 qty = 2;\n}\n"
    )
    answer = http.post(
        "/subjects/orders-text/versions", json={"schema": text, "schemaType": "PROTOBUF"}
    )
    assert answer.status_code == 200, answer.text
    schema_id = answer.json()["id"]
    assert http.get(f"/schemas/ids/{schema_id}").json()["schema"] == text
    encoded = http.get(f"/schemas/ids/{schema_id}?format=serialized").json()["schema"]
    fd = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(encoded))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    Order = message_factory.GetMessageClass(pool.FindMessageTypeByName("sbtext.Order"))
    order = Order(id="o1", kind=1)
    order.lines.add(sku="s", qty=2)
    order.tags["x"] = 7
    # Confluent's framing: magic 0, the id, message index 0 (first message), the payload
    payload = b"\x00" + schema_id.to_bytes(4, "big") + b"\x00" + order.SerializeToString()
    with SchemaRegistryClient({"url": url(broker)}) as client:
        deserializer = ProtobufDeserializer(Order, schema_registry_client=client)
        ctx = SerializationContext("orders-text", MessageField.VALUE)
        assert deserializer(payload, ctx) == order
