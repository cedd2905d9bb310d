"""Schema formats: parse, identify, normalise and compare AVRO, JSON and PROTOBUF schemas.

A schema is parsed once into a :class:`ParsedSchema`, which knows its format's rules:
``incompatibilities(writer)`` lists why data written with ``writer`` could not be read
with this schema (empty: it can). Identity decides when two registrations are the same
schema (and so share an id): Confluent compares schemas by their canonical string,
so JSON whitespace never makes a new id; ``normalize=true`` goes further (sorted keys,
the generator's layout of a ``.proto``).

AVRO is parsed by ``fastavro`` (what the registry stores must be what serializers
can use) and compared by the ``avro`` package's reader/writer checker, which follows
the Avro specification's resolution rules that Confluent applies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import avro.errors
import avro.name
import avro.schema
import fastavro
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from streambus.schemas.errors import InvalidSchemaError
from streambus.schemas.json_format import JSON, JsonSchema
from streambus.schemas.protobuf_format import PROTOBUF, ProtobufSchema

AVRO = "AVRO"
SCHEMA_TYPES = (JSON, PROTOBUF, AVRO)  # the order Confluent's /schemas/types answers


@dataclass(frozen=True, slots=True)
class SchemaReference:
    """A named dependency on another subject's version (Confluent's schema references)."""

    name: str
    subject: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "subject": self.subject, "version": self.version}


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """A schema as the registry holds it under its id."""

    schema_id: int
    schema_type: str  # "AVRO" | "JSON" | "PROTOBUF"
    schema: str
    references: tuple[SchemaReference, ...] = ()


class ParsedSchema(Protocol):
    schema_type: str

    def normalized(self) -> str:
        """The text stored when ``normalize=true``."""
        ...

    def incompatibilities(self, writer: ParsedSchema) -> list[str]:
        """Why data written with ``writer`` cannot be read with this schema (empty: it can)."""
        ...


@dataclass(frozen=True, slots=True)
class Resolved:
    """A reference with the schema it names, for parsing the schema that uses it."""

    name: str
    schema_type: str
    schema: str


def identity(schema_type: str, text: str) -> str:
    """The canonical string that decides whether two registrations are the same schema."""
    if schema_type in (AVRO, JSON):
        try:
            return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
        except ValueError:
            return text.strip()
    return text.strip()


def parse(schema_type: str, text: str, references: Sequence[Resolved] = ()) -> ParsedSchema:
    """Parse ``text`` as ``schema_type``; InvalidSchemaError says why it is not one."""
    if schema_type == AVRO:
        return AvroSchema.parse(text, references)
    if schema_type == JSON:
        return JsonSchema.parse(text)
    if schema_type == PROTOBUF:
        return ProtobufSchema.parse(text)
    raise InvalidSchemaError(f"Invalid schema type {schema_type!r}")


class AvroSchema:
    schema_type = AVRO

    def __init__(self, obj: Any, checked: avro.schema.Schema) -> None:
        self._obj = obj
        self._checked = checked

    @classmethod
    def parse(cls, text: str, references: Sequence[Resolved] = ()) -> AvroSchema:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidSchemaError(f"Invalid schema: not JSON: {exc}") from None
        named: dict[str, Any] = {}
        names = avro.name.Names()
        try:
            for ref in references:
                ref_obj = json.loads(ref.schema)
                fastavro.parse_schema(ref_obj, named_schemas=named)
                avro.schema.make_avsc_object(ref_obj, names)
            fastavro.parse_schema(obj, named_schemas=named)
            checked = avro.schema.make_avsc_object(obj, names)
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            fastavro.schema.SchemaParseException,
            fastavro.schema.UnknownType,
            avro.errors.AvroException,
        ) as exc:
            raise InvalidSchemaError(f"Invalid schema: {exc}") from None
        return cls(obj, checked)

    def normalized(self) -> str:
        return json.dumps(self._obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def incompatibilities(self, writer: ParsedSchema) -> list[str]:
        if not isinstance(writer, AvroSchema):
            return [f"schema type changed from {writer.schema_type} to AVRO"]
        result = ReaderWriterCompatibilityChecker().get_compatibility(  # type: ignore[no-untyped-call]
            self._checked, writer._checked
        )
        if result.compatibility is SchemaCompatibilityType.compatible:
            return []
        return sorted(
            f"{kind.name}: {message} at {location}"
            for kind, message, location in zip(
                result.incompatibilities,
                sorted(result.messages),
                sorted(result.locations),
                strict=False,
            )
        ) or ["incompatible"]
