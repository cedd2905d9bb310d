"""JSON Schema: checked against its draft's meta-schema by ``jsonschema``, compared with
Confluent's JSON Schema rules at a practical level.

Confluent's rules, as applied here (reader = the schema that reads, writer = the one
that wrote the data):
- a type may widen (``integer`` to ``number``, a new member of a type list), not narrow;
- an ``enum`` may gain values, not lose them; bounds (``maxLength``, ``minimum``, ...)
  may loosen, not tighten;
- a property the reader requires must be required by the writer too;
- a property the reader adds is fine where the writer's content model is closed
  (``additionalProperties: false``), but not where it is open: the writer may have
  written anything under that name (PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL);
- a property the reader drops is fine where the reader is open, not where it is closed;
- ``additionalProperties`` may open, not close.
Sub-schemas (``properties``, ``items``) are compared the same way, recursively.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import jsonschema.exceptions  # type: ignore[import-untyped]
import jsonschema.validators  # type: ignore[import-untyped]

from streambus.schemas.errors import InvalidSchemaError

JSON = "JSON"

# Bounds that reject more data as they grow (lower bounds) or shrink (upper bounds).
_LOWER_BOUNDS = ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties")
_UPPER_BOUNDS = ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties")


class JsonSchema:
    schema_type = JSON

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    @classmethod
    def parse(cls, text: str) -> JsonSchema:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidSchemaError(f"Invalid schema: not JSON: {exc}") from None
        if not isinstance(obj, dict | bool):
            raise InvalidSchemaError("Invalid schema: a JSON Schema is an object or a boolean")
        try:
            jsonschema.validators.validator_for(obj).check_schema(obj)
        except jsonschema.exceptions.SchemaError as exc:
            raise InvalidSchemaError(f"Invalid schema: {exc.message}") from None
        return cls(obj)

    def normalized(self) -> str:
        return json.dumps(self._obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def incompatibilities(self, writer: object) -> list[str]:
        if not isinstance(writer, JsonSchema):
            return [f"schema type changed from {getattr(writer, 'schema_type', '?')} to JSON"]
        out: list[str] = []
        _compare(self._obj, writer._obj, "#", out)
        return out


def _types(schema: dict[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None  # any type
    return {kind} if isinstance(kind, str) else set(kind)


def _compare(reader: Any, writer: Any, path: str, out: list[str]) -> None:
    if reader is True or reader == {}:
        return  # reads anything
    if reader is False:
        if writer is not False:
            out.append(f"TYPE_NARROWED: {path} accepts nothing")
        return
    if writer is True or writer is False or not isinstance(writer, dict):
        writer = {}
    if not isinstance(reader, dict):
        return
    r_types, w_types = _types(reader), _types(writer)
    if r_types is not None:
        widened = set(r_types) | ({"integer"} if "number" in r_types else set())
        if w_types is None or not w_types <= widened:
            out.append(
                f"TYPE_NARROWED: {path} from {sorted(w_types or ['any'])} to {sorted(r_types)}"
            )
            return
    if "enum" in reader and not set(map(json.dumps, writer.get("enum", [None]))) <= set(
        map(json.dumps, reader["enum"])
    ):
        out.append(f"ENUM_ARRAY_NARROWED: {path}")
    for key in _LOWER_BOUNDS:
        if key in reader and (key not in writer or reader[key] > writer[key]):
            out.append(f"{key.upper()}_ADDED_OR_INCREASED: {path}")
    for key in _UPPER_BOUNDS:
        if key in reader and (key not in writer or reader[key] < writer[key]):
            out.append(f"{key.upper()}_ADDED_OR_DECREASED: {path}")
    _compare_objects(reader, writer, path, out)
    if "items" in reader and isinstance(reader["items"], dict | bool):
        _compare(reader["items"], writer.get("items", True), path + "/items", out)


def _compare_objects(
    reader: dict[str, Any], writer: dict[str, Any], path: str, out: list[str]
) -> None:
    r_props: dict[str, Any] = reader.get("properties", {})
    w_props: dict[str, Any] = writer.get("properties", {})
    reader_open = reader.get("additionalProperties", True) is not False
    writer_open = writer.get("additionalProperties", True) is not False
    if writer_open and not reader_open:
        out.append(f"ADDITIONAL_PROPERTIES_REMOVED: {path}")
    for name, sub in r_props.items():
        where = f"{path}/properties/{name}"
        if name in w_props:
            _compare(sub, w_props[name], where, out)
        elif writer_open:
            out.append(f"PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL: {where}")
    for name in w_props:
        if name not in r_props and not reader_open:
            out.append(f"PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL: {path}/properties/{name}")
    required = set(writer.get("required", []))
    for name in reader.get("required", []):
        if name not in required:
            out.append(f"REQUIRED_ATTRIBUTE_ADDED: {path}/properties/{name}")
