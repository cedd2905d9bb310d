"""Broker-side schema validation of produced records (Confluent Server's
``confluent.value.schema.validation``), against the schema registry.

A topic with ``confluent.key.schema.validation`` or ``confluent.value.schema.validation``
set checks each record's key or value before anything of its batch is stored:

- ``id`` mode (``streambus.*.schema.validation.mode``, the default, what Confluent Server
  does): the bytes start with the wire format's magic byte 0 and a 4-byte big-endian
  schema id, and that id is registered under the record's subject. Only those 5 bytes
  are read.
- ``full`` mode: also the rest decodes with that schema. AVRO: fastavro's schemaless
  reader, every byte consumed. JSON: ``json.loads`` and the JSON Schema (``jsonschema``).
  PROTOBUF: the message-index array names a message of the ``.proto``, and the payload is
  well-formed protobuf wire format (tags, wire types, lengths, groups), recursing into
  fields whose type is a message of the same file, and proto3 strings are UTF-8. Field
  values are not range-checked: protobuf itself keeps unknown and mistyped fields as
  unknown fields. An AVRO or JSON schema with references is checked id-only (the
  registry's references are not resolved here); a PROTOBUF one recurses only into its
  own file's messages.

The subject follows ``confluent.*.subject.name.strategy``: TopicNameStrategy
(``<topic>-key``/``<topic>-value``), RecordNameStrategy (the schema's record name: AVRO
``namespace.name``, JSON ``title``, PROTOBUF ``package.FirstMessage``) or
TopicRecordNameStrategy (``<topic>-<record name>``).

A null key or value (a tombstone) carries no schema and passes. Without a registry
(``--schema-registry-port 0``) every non-null record of a validating topic is refused,
reason ``registry_disabled``: accepting it would store what the topic promised to refuse.

Costs are per batch where ids repeat: each distinct id of a batch is looked up once (the
registry answers from memory), and parsed schemas and decoders are kept by id in a
bounded LRU. Topics without validation pay nothing: the partition service asks
``wanted(config)`` (two attribute reads) before anything is decoded.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import fastavro
import jsonschema  # type: ignore[import-untyped]
from proto_schema_parser import ast as proto_ast
from proto_schema_parser.parser import Parser as ProtoParser

from streambus.errors import InvalidRecordError
from streambus.records.batch import Buffer, Record, checked_records, parse_batches
from streambus.topic_config import SchemaValidationMode, SubjectNameStrategy, TopicConfig

__all__ = [
    "DECODE_FAILED",
    "MISSING_MAGIC_BYTE",
    "REGISTRY_DISABLED",
    "SUBJECT_MISMATCH",
    "UNKNOWN_SCHEMA_ID",
    "BatchVerdict",
    "RegisteredSchema",
    "SchemaSource",
    "SchemaValidation",
]

# Reasons, the ``reason`` label of streambus_schema_validation_errors_total.
MISSING_MAGIC_BYTE: Final = "missing_magic_byte"  # shorter than 5 bytes, or not magic 0
UNKNOWN_SCHEMA_ID: Final = "unknown_schema_id"  # no schema has that id
SUBJECT_MISMATCH: Final = "subject_mismatch"  # the id is not registered under the subject
DECODE_FAILED: Final = "decode_failed"  # full mode: the payload does not decode
REGISTRY_DISABLED: Final = "registry_disabled"  # the broker runs no schema registry

MAGIC = 0
WIRE_HEADER = 5  # magic byte + 4-byte big-endian schema id
# Parsed schemas kept (each holds a decoder; an Avro one a few KB).
CACHE_SCHEMAS = 1000
# Records checked between yields to the event loop: a slice stays around 5 ms in full
# mode (~8 us a small Avro record) and id mode (~3 us a record), measured on one core.
RECORDS_PER_SLICE = {SchemaValidationMode.ID: 2048, SchemaValidationMode.FULL: 512}
# Longest reason text quoted from a decoder (a JSON Schema error can quote the document).
MAX_PROBLEM_CHARS = 200
# Message-index arrays longer than this are refused (nesting deeper than any real .proto).
MAX_MESSAGE_INDEXES = 64
MAX_PROTO_DEPTH = 100


class RegisteredSchema(Protocol):
    """A schema as the registry holds it."""

    @property
    def schema_id(self) -> int: ...
    @property
    def schema_type(self) -> str: ...  # "AVRO", "JSON" or "PROTOBUF"
    @property
    def schema(self) -> str: ...  # the schema text
    @property
    def references(self) -> tuple[Any, ...]: ...


class SchemaSource(Protocol):
    """What validation asks of the registry; both calls are synchronous and cheap."""

    def schema_by_id(self, schema_id: int) -> RegisteredSchema | None: ...
    def subject_has_id(self, subject: str, schema_id: int) -> bool: ...


class _Telemetry(Protocol):
    def schema_validated(self, topic: str, records: int, errors: Counter[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchVerdict:
    records: int  # records validated
    failures: tuple[tuple[int, str, str], ...]  # (index in batch, reason, message)

    def reasons(self) -> Counter[str]:
        return Counter(reason for _, reason, _ in self.failures)

    def error(self) -> InvalidRecordError:
        first_index, _, first = self.failures[0]
        return InvalidRecordError(
            f"{len(self.failures)} of {self.records} record(s) failed schema validation; "
            f"first: record {first_index}: {first}",
            tuple((index, message) for index, _, message in self.failures),
        )


# A decoder: the payload (wire header included) -> the problem, or None.
_Decoder = Callable[[bytes], str | None]


@dataclass(frozen=True, slots=True)
class _Parsed:
    schema_type: str
    text: str
    record_name: str | None  # for RecordNameStrategy
    decoder: _Decoder | None  # None: not decodable here (references), checked id-only


class SchemaValidation:
    """The schema checks of the produce path; ``source`` is set by the broker when it
    runs a registry (None: refuse, reason ``registry_disabled``)."""

    def __init__(self, telemetry: _Telemetry, cache_size: int = CACHE_SCHEMAS) -> None:
        self.source: SchemaSource | None = None
        self._telemetry = telemetry
        self._cache: OrderedDict[int, _Parsed] = OrderedDict()
        self._cache_size = cache_size

    @staticmethod
    def wanted(config: TopicConfig) -> bool:
        return config.confluent_value_schema_validation or config.confluent_key_schema_validation

    async def check(
        self, topic: str, records: Buffer, config: TopicConfig, *, off_loop: bool
    ) -> int | None:
        """Check a produced batch of a validating topic. Returns its payload bytes (the
        append's record checks done on the same decompression), or None for a batch the
        append refuses for its structure anyway; raises INVALID_RECORD naming each
        failing record. Counted once per batch. ``off_loop``: decompress in a thread."""
        if len(records) > config.max_message_bytes:
            return None  # MESSAGE_TOO_LARGE, before anything is inflated
        batches = parse_batches(records)
        if len(batches) != 1 or batches[0][1].is_control:
            return None
        pos, header = batches[0]
        check = functools.partial(
            checked_records,
            records,
            pos,
            header,
            limit=config.max_message_bytes,
            keys_required=config.cleanup_policy.compacts,
        )
        payload, buf, start, _ = await asyncio.to_thread(check) if off_loop else check()
        checker = _BatchChecker(self, topic, config)
        step = RECORDS_PER_SLICE[checker.slowest]
        heads = checker.head_only
        fields = _key_values(buf, start, header.records_count, heads[0], heads[1])
        for index, (key, value) in enumerate(fields):
            if index and index % step == 0:
                await asyncio.sleep(0)
            checker.check(index, key, value)
        verdict = checker.verdict()
        self._count(topic, verdict)
        if verdict.failures:
            raise verdict.error()
        return payload

    def check_records(
        self, topic: str, config: TopicConfig, records: Iterable[Record]
    ) -> BatchVerdict:
        """The same checks over records already decoded, at once (not counted)."""
        checker = _BatchChecker(self, topic, config)
        for index, record in enumerate(records):
            checker.check(index, record.key, record.value)
        return checker.verdict()

    def _count(self, topic: str, verdict: BatchVerdict) -> None:
        self._telemetry.schema_validated(topic, verdict.records, verdict.reasons())

    # -- parsed schemas, by id --------------------------------------------------------
    def parsed(self, registered: RegisteredSchema) -> _Parsed | str:
        """The parsed schema (cached), or why it does not parse."""
        schema_id = registered.schema_id
        entry = self._cache.get(schema_id)
        if (
            entry is not None
            and entry.text == registered.schema
            and entry.schema_type == registered.schema_type
        ):
            self._cache.move_to_end(schema_id)
            return entry
        try:
            entry = _parse(registered)
        except Exception as exc:  # any parser's complaint is the answer
            return f"schema id {schema_id} does not parse: {_short(exc)}"
        self._cache[schema_id] = entry
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry


@dataclass(slots=True)
class _Side:
    """What one side (key or value) of a topic's records must carry."""

    name: str  # "key" or "value"
    strategy: SubjectNameStrategy
    full: bool
    topic_subject: str  # TopicNameStrategy's subject
    # schema id -> the parsed schema this batch resolved it to, or (reason, message)
    resolved: dict[int, _Parsed | tuple[str, str] | None]


class _BatchChecker:
    """One batch's checks: each distinct schema id is resolved once per side."""

    def __init__(self, validation: SchemaValidation, topic: str, config: TopicConfig) -> None:
        self._validation = validation
        self._source = validation.source
        self._topic = topic
        self._sides: list[_Side] = []
        if config.confluent_key_schema_validation:
            self._sides.append(
                _Side(
                    "key",
                    config.confluent_key_subject_name_strategy,
                    config.streambus_key_schema_validation_mode is SchemaValidationMode.FULL,
                    f"{topic}-key",
                    {},
                )
            )
        if config.confluent_value_schema_validation:
            self._sides.append(
                _Side(
                    "value",
                    config.confluent_value_subject_name_strategy,
                    config.streambus_value_schema_validation_mode is SchemaValidationMode.FULL,
                    f"{topic}-value",
                    {},
                )
            )
        full = any(side.full for side in self._sides)
        self.slowest = SchemaValidationMode.FULL if full else SchemaValidationMode.ID
        self._count = 0
        self._failures: list[tuple[int, str, str]] = []

    @property
    def head_only(self) -> tuple[bool, bool]:
        """(key, value): whether only the 5-byte wire header of each is read."""
        full = {side.name: side.full for side in self._sides}
        return not full.get("key", False), not full.get("value", False)

    def check(self, index: int, key: bytes | None, value: bytes | None) -> None:
        self._count += 1
        for side in self._sides:
            data = key if side.name == "key" else value
            if data is None:
                continue
            problem = self._check(side, data)
            if problem is not None:
                reason, message = problem
                self._failures.append((index, reason, message))
                return  # one failure per record

    def verdict(self) -> BatchVerdict:
        return BatchVerdict(self._count, tuple(self._failures))

    def _check(self, side: _Side, data: bytes) -> tuple[str, str] | None:
        if len(data) < WIRE_HEADER or data[0] != MAGIC:
            return (
                MISSING_MAGIC_BYTE,
                f"{side.name} does not start with magic byte 0 and a 4-byte schema id",
            )
        schema_id = int.from_bytes(data[1:WIRE_HEADER], "big")
        if schema_id in side.resolved:
            resolved = side.resolved[schema_id]
        else:
            resolved = side.resolved[schema_id] = self._resolve(side, schema_id)
        if isinstance(resolved, tuple):
            return resolved
        if resolved is None or resolved.decoder is None:
            return None  # id mode, or a schema checked id-only
        problem = resolved.decoder(data)
        if problem is None:
            return None
        return DECODE_FAILED, f"{side.name} does not decode with schema id {schema_id}: {problem}"

    def _resolve(self, side: _Side, schema_id: int) -> _Parsed | tuple[str, str] | None:
        """The parsed schema (full mode), None (id mode, fine), or the failure."""
        source = self._source
        if source is None:
            return REGISTRY_DISABLED, "schema registry disabled"
        registered = source.schema_by_id(schema_id)
        if registered is None:
            return UNKNOWN_SCHEMA_ID, f"{side.name} schema id {schema_id} is not registered"
        parsed: _Parsed | str | None = None
        if side.strategy is SubjectNameStrategy.TOPIC:
            subject = side.topic_subject
        else:
            parsed = self._validation.parsed(registered)
            if isinstance(parsed, str):
                return DECODE_FAILED, parsed
            name = parsed.record_name
            if not name:
                return (
                    SUBJECT_MISMATCH,
                    f"{side.name} schema id {schema_id} has no record name to name its subject",
                )
            subject = (
                name if side.strategy is SubjectNameStrategy.RECORD else f"{self._topic}-{name}"
            )
        if not source.subject_has_id(subject, schema_id):
            return (
                SUBJECT_MISMATCH,
                f"{side.name} schema id {schema_id} is not registered under subject {subject!r}",
            )
        if not side.full:
            return None
        if parsed is None:
            parsed = self._validation.parsed(registered)
        if isinstance(parsed, str):
            return DECODE_FAILED, parsed
        return parsed


def _zigzag(buf: Buffer, i: int) -> tuple[int, int]:
    """A zigzag varint at ``i`` (the batch framing is checked already): (value, next)."""
    b = buf[i]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), i + 1
    result, shift = b & 0x7F, 7
    while True:
        i += 1
        b = buf[i]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), i + 1
        shift += 7


def _key_values(
    buf: Buffer, i: int, count: int, key_head: bool, value_head: bool
) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Each record's (key, value) of a checked records section, without decoding the rest of
    the record; ``*_head``: only the first 5 bytes of it (id mode reads no more)."""
    for _ in range(count):
        length, i = _zigzag(buf, i)
        record_end = i + length
        j = i + 1  # attributes
        while buf[j] & 0x80:  # timestampDelta
            j += 1
        j += 1
        while buf[j] & 0x80:  # offsetDelta
            j += 1
        j += 1
        size, j = _zigzag(buf, j)
        key = None
        if size >= 0:
            key = bytes(buf[j : j + (min(size, WIRE_HEADER) if key_head else size)])
            j += size
        size, j = _zigzag(buf, j)
        value = None
        if size >= 0:
            value = bytes(buf[j : j + (min(size, WIRE_HEADER) if value_head else size)])
        yield key, value
        i = record_end


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 3] + "..."


def _parse(registered: RegisteredSchema) -> _Parsed:
    kind = registered.schema_type.upper()
    text = registered.schema
    has_refs = bool(registered.references)
    if kind == "AVRO":
        name, decoder = _avro(text, has_refs)
    elif kind == "JSON":
        name, decoder = _json_schema(text, has_refs)
    elif kind == "PROTOBUF":
        name, decoder = _protobuf(text)
    else:
        raise ValueError(f"unknown schema type {registered.schema_type!r}")
    return _Parsed(registered.schema_type, text, name, decoder)


# -- AVRO ---------------------------------------------------------------------------------
def _avro(text: str, has_refs: bool) -> tuple[str | None, _Decoder | None]:
    raw = json.loads(text)
    name = None
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        name = raw["name"]
        namespace = raw.get("namespace")
        if "." not in name and isinstance(namespace, str) and namespace:
            name = f"{namespace}.{name}"
    if has_refs:
        return name, None
    schema = fastavro.parse_schema(raw)

    def decode(data: bytes) -> str | None:
        stream = io.BytesIO(data)
        stream.seek(WIRE_HEADER)
        try:
            fastavro.schemaless_reader(stream, schema, None)
        except Exception as exc:  # fastavro raises many kinds on bad input
            return _short(exc)
        left = len(data) - stream.tell()
        return f"{left} byte(s) left after the record" if left else None

    return name, decode


# -- JSON Schema --------------------------------------------------------------------------
def _json_schema(text: str, has_refs: bool) -> tuple[str | None, _Decoder | None]:
    raw = json.loads(text)
    title = raw.get("title") if isinstance(raw, dict) else None
    name = title if isinstance(title, str) else None
    if has_refs:
        return name, None
    validator = jsonschema.validators.validator_for(raw)(raw)

    def decode(data: bytes) -> str | None:
        try:
            document = json.loads(data[WIRE_HEADER:])
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            return f"not JSON: {_short(exc)}"
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(document))
        except Exception as exc:  # an unresolvable $ref, say
            return _short(exc)
        return None if error is None else _short(error.message)

    return name, decode


# -- PROTOBUF -----------------------------------------------------------------------------
class _MalformedError(Exception):
    pass


@dataclass(slots=True)
class _ProtoMessage:
    full_name: str
    nested: list[_ProtoMessage]  # in declaration order, as message indexes count them
    fields: dict[int, str]  # field number -> declared type name
    message_fields: dict[int, _ProtoMessage]  # resolved after the whole file is read


_WIRE_FIXED = {1: 8, 5: 4}


def _protobuf(text: str) -> tuple[str | None, _Decoder]:
    tree = ProtoParser().parse(text)
    package = ""
    for element in tree.file_elements:
        if isinstance(element, proto_ast.Package):
            package = element.name
    by_name: dict[str, _ProtoMessage] = {}
    top = [
        _proto_message(element, package, by_name)
        for element in tree.file_elements
        if isinstance(element, proto_ast.Message)
    ]
    for message in by_name.values():
        for number, type_name in message.fields.items():
            target = _resolve_type(type_name, message.full_name, by_name)
            if target is not None:
                message.message_fields[number] = target
    proto3 = tree.syntax == "proto3"
    name = top[0].full_name if top else None

    def decode(data: bytes) -> str | None:
        try:
            i, message = _message_indexes(data, WIRE_HEADER, top)
            _walk(data, i, len(data), message, proto3=proto3, depth=0, group=None)
        except _MalformedError as exc:
            return str(exc)
        except IndexError:
            return "protobuf data runs past its end"
        return None

    return name, decode


def _proto_message(
    element: proto_ast.Message, scope: str, by_name: dict[str, _ProtoMessage]
) -> _ProtoMessage:
    full_name = f"{scope}.{element.name}" if scope else element.name
    message = _ProtoMessage(full_name, [], {}, {})
    by_name[full_name] = message
    for child in element.elements:
        if isinstance(child, proto_ast.Message):
            message.nested.append(_proto_message(child, full_name, by_name))
        elif isinstance(child, proto_ast.Field):
            message.fields[child.number] = child.type
        elif isinstance(child, proto_ast.OneOf):
            for field in child.elements:
                if isinstance(field, proto_ast.Field):
                    message.fields[field.number] = field.type
    return message


def _resolve_type(
    type_name: str, scope: str, by_name: dict[str, _ProtoMessage]
) -> _ProtoMessage | None:
    """A field's message type by protobuf's scoping rules, if it is a message of this file."""
    if type_name.startswith("."):
        return by_name.get(type_name[1:])
    parts = scope.split(".")
    while parts:
        found = by_name.get(".".join([*parts, type_name]))
        if found is not None:
            return found
        parts.pop()
    return by_name.get(type_name)


def _uvarint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise _MalformedError("varint longer than 10 bytes")


def _message_indexes(
    data: bytes, i: int, top: Sequence[_ProtoMessage]
) -> tuple[int, _ProtoMessage]:
    """Confluent's message-index array (zigzag varints: a count, then that many indexes;
    a single 0 means ``[0]``) and the message it names."""
    raw, i = _uvarint(data, i)
    count = (raw >> 1) ^ -(raw & 1)
    indexes = [0]
    if count:
        if not 0 < count <= MAX_MESSAGE_INDEXES:
            raise _MalformedError(f"message index count {count} out of range")
        indexes = []
        for _ in range(count):
            raw, i = _uvarint(data, i)
            indexes.append((raw >> 1) ^ -(raw & 1))
    choices = top
    message = None
    for index in indexes:
        if not 0 <= index < len(choices):
            raise _MalformedError(f"message indexes {indexes} name no message of the schema")
        message = choices[index]
        choices = message.nested
    assert message is not None  # indexes is never empty
    return i, message


def _walk(
    buf: bytes,
    i: int,
    end: int,
    message: _ProtoMessage | None,
    *,
    proto3: bool,
    depth: int,
    group: int | None,
) -> int:
    """Check the wire format of one message in ``buf[i:end]``; inside a group, stop at its
    end tag. Returns where it stopped."""
    if depth > MAX_PROTO_DEPTH:
        raise _MalformedError("protobuf nested too deeply")
    while i < end:
        tag, i = _uvarint(buf, i)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _MalformedError("protobuf field number 0")
        if wire == 0:
            _, i = _uvarint(buf, i)
        elif wire in _WIRE_FIXED:
            i += _WIRE_FIXED[wire]
        elif wire == 2:
            size, i = _uvarint(buf, i)
            if i + size > end:
                raise _MalformedError(f"field {number} length {size} runs past the message")
            if message is not None:
                target = message.message_fields.get(number)
                if target is not None:
                    _walk(buf, i, i + size, target, proto3=proto3, depth=depth + 1, group=None)
                elif proto3 and message.fields.get(number) == "string":
                    try:
                        buf[i : i + size].decode("utf-8")
                    except UnicodeDecodeError:
                        raise _MalformedError(f"string field {number} is not UTF-8") from None
            i += size
        elif wire == 3:
            i = _walk(buf, i, end, None, proto3=proto3, depth=depth + 1, group=number)
        elif wire == 4:
            if group != number:
                raise _MalformedError(f"unmatched end of group {number}")
            return i
        else:
            raise _MalformedError(f"field {number} has invalid wire type {wire}")
    if i > end:
        raise _MalformedError("protobuf data runs past its end")
    if group is not None:
        raise _MalformedError(f"group {group} is not closed")
    return i
