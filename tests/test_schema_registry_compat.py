"""Compatibility levels for each format, through the REST API: an evolution a level allows
is registered, one it forbids gets 409; the _TRANSITIVE levels check every version."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import BrokerThread, free_port

LEVELS = ("BACKWARD", "FORWARD", "FULL", "NONE")
_subjects = itertools.count()


def avro(*fields: dict[str, Any]) -> str:
    return json.dumps({"type": "record", "name": "R", "namespace": "c", "fields": list(fields)})


def jsonschema(props: dict[str, Any], closed: bool = True, required: tuple[str, ...] = ()) -> str:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if closed:
        schema["additionalProperties"] = False
    if required:
        schema["required"] = list(required)
    return json.dumps(schema)


def proto(body: str, extra: str = "") -> str:
    return f'syntax = "proto3";\npackage c;\nmessage R {{\n{body}\n}}\n{extra}'


A_INT = {"name": "a", "type": "int"}
# (format, name, base, evolution, levels that allow it)
CASES: list[tuple[str, str, str, str, set[str]]] = [
    ("AVRO", "add field with default", avro(A_INT),
     avro(A_INT, {"name": "b", "type": "string", "default": ""}), set(LEVELS)),
    ("AVRO", "add field without default", avro(A_INT),
     avro(A_INT, {"name": "b", "type": "string"}), {"FORWARD", "NONE"}),
    ("AVRO", "remove field without default", avro(A_INT, {"name": "b", "type": "string"}),
     avro(A_INT), {"BACKWARD", "NONE"}),
    ("AVRO", "promote int to long", avro(A_INT), avro({"name": "a", "type": "long"}),
     {"BACKWARD", "NONE"}),
    ("AVRO", "change int to string", avro(A_INT), avro({"name": "a", "type": "string"}), {"NONE"}),
    ("JSON", "add optional property (closed model)", jsonschema({"a": {"type": "integer"}}),
     jsonschema({"a": {"type": "integer"}, "b": {"type": "string"}}), {"BACKWARD", "NONE"}),
    ("JSON", "widen integer to number", jsonschema({"a": {"type": "integer"}}),
     jsonschema({"a": {"type": "number"}}), {"BACKWARD", "NONE"}),
    ("JSON", "narrow number to integer", jsonschema({"a": {"type": "number"}}),
     jsonschema({"a": {"type": "integer"}}), {"FORWARD", "NONE"}),
    ("JSON", "require a property", jsonschema({"a": {"type": "integer"}}, closed=False),
     jsonschema({"a": {"type": "integer"}}, closed=False, required=("a",)), {"FORWARD", "NONE"}),
    ("JSON", "add a description", jsonschema({"a": {"type": "integer"}}),
     jsonschema({"a": {"type": "integer", "description": "d"}}), set(LEVELS)),
    ("JSON", "change string to integer", jsonschema({"a": {"type": "string"}}),
     jsonschema({"a": {"type": "integer"}}), {"NONE"}),
    ("PROTOBUF", "add a field", proto("int32 a = 1;"), proto("int32 a = 1;\nstring b = 2;"),
     set(LEVELS)),
    ("PROTOBUF", "rename a field, widen int32 to int64", proto("int32 a = 1;"),
     proto("int64 renamed = 1;"), set(LEVELS)),
    ("PROTOBUF", "remove a message", proto("int32 a = 1;", "message Other { int32 x = 1; }"),
     proto("int32 a = 1;"), {"FORWARD", "NONE"}),
    ("PROTOBUF", "change int32 to string", proto("int32 a = 1;"), proto("string a = 1;"),
     {"NONE"}),
    ("PROTOBUF", "change the package", proto("int32 a = 1;"),
     proto("int32 a = 1;").replace("package c;", "package d;"), {"NONE"}),
]  # fmt: skip

# (format, v1, v2 (incompatible with v1, registered under NONE), v3: compatible with v2 under
# every level but not with v1)
TRANSITIVE: list[tuple[str, str, str, str]] = [
    ("AVRO", avro(A_INT), avro({"name": "a", "type": "string"}),
     avro({"name": "a", "type": "string"}, {"name": "c", "type": "int", "default": 0})),
    ("JSON", jsonschema({"a": {"type": "integer"}}), jsonschema({"a": {"type": "string"}}),
     jsonschema({"a": {"type": "string", "description": "d"}})),
    ("PROTOBUF", proto("int32 a = 1;"), proto("string a = 1;"),
     proto("string a = 1;\nint32 c = 2;")),
]  # fmt: skip


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with BrokerThread(tmp_path_factory.mktemp("compat"), schema_registry_port=free_port()) as b:
        base = f"http://127.0.0.1:{b.broker.schema_registry_port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client


def register(http: httpx.Client, subject: str, schema_type: str, schema: str) -> httpx.Response:
    return http.post(
        f"/subjects/{subject}/versions", json={"schema": schema, "schemaType": schema_type}
    )


def fresh_subject(http: httpx.Client, level: str) -> str:
    subject = f"compat-{next(_subjects)}"
    assert http.put(f"/config/{subject}", json={"compatibility": level}).is_success
    return subject


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(("schema_type", "name", "base", "new", "allowed"), CASES)
def test_each_level_allows_and_forbids(
    http: httpx.Client,
    *,
    level: str,
    schema_type: str,
    name: str,
    base: str,
    new: str,
    allowed: set[str],
) -> None:
    subject = fresh_subject(http, level)
    assert register(http, subject, schema_type, base).status_code == 200
    body = {"schema": new, "schemaType": schema_type}
    check = http.post(f"/compatibility/subjects/{subject}/versions/latest?verbose=true", json=body)
    answer = register(http, subject, schema_type, new)
    if level in allowed:
        assert answer.status_code == 200, (name, answer.text)
        assert check.json() == {"is_compatible": True, "messages": []}
        assert http.get(f"/subjects/{subject}/versions").json() == [1, 2]
    else:
        assert answer.status_code == 409, (name, answer.text)
        assert answer.json()["error_code"] == 409
        assert check.json()["is_compatible"] is False
        assert check.json()["messages"], name
        assert http.get(f"/subjects/{subject}/versions").json() == [1]


@pytest.mark.parametrize("level", ["BACKWARD", "FORWARD", "FULL"])
@pytest.mark.parametrize(("schema_type", "v1", "v2", "v3"), TRANSITIVE)
def test_transitive_levels_check_every_version(
    http: httpx.Client, *, level: str, schema_type: str, v1: str, v2: str, v3: str
) -> None:
    for transitive, expected in ((False, 200), (True, 409)):
        subject = fresh_subject(http, "NONE")
        assert register(http, subject, schema_type, v1).status_code == 200
        assert register(http, subject, schema_type, v2).status_code == 200
        full_level = level + "_TRANSITIVE" if transitive else level
        assert http.put(f"/config/{subject}", json={"compatibility": full_level}).is_success
        answer = register(http, subject, schema_type, v3)
        assert answer.status_code == expected, (full_level, answer.text)


def test_soft_deleted_versions_are_not_checked(http: httpx.Client) -> None:
    subject = fresh_subject(http, "BACKWARD_TRANSITIVE")
    assert register(http, subject, "AVRO", avro(A_INT)).status_code == 200
    assert http.put(f"/config/{subject}", json={"compatibility": "NONE"}).is_success
    assert register(http, subject, "AVRO", avro({"name": "a", "type": "string"})).is_success
    assert http.put(f"/config/{subject}", json={"compatibility": "BACKWARD_TRANSITIVE"}).is_success
    v3 = avro({"name": "a", "type": "string"}, {"name": "c", "type": "int", "default": 0})
    assert register(http, subject, "AVRO", v3).status_code == 409
    assert http.delete(f"/subjects/{subject}/versions/1").is_success
    assert register(http, subject, "AVRO", v3).status_code == 200


def test_global_level_applies_where_a_subject_has_none(http: httpx.Client) -> None:
    subject = f"global-{next(_subjects)}"
    assert register(http, subject, "AVRO", avro(A_INT)).status_code == 200
    widened = avro(A_INT, {"name": "b", "type": "string"})
    try:
        assert http.put("/config", json={"compatibility": "FORWARD"}).is_success
        assert register(http, subject, "AVRO", widened).status_code == 200
    finally:
        assert http.put("/config", json={"compatibility": "BACKWARD"}).is_success
