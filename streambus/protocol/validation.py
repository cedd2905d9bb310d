"""Schema checks every decoded request passes before its handler sees it.

kafka-python's decoder is lenient where Kafka's generated readers are strict:
it turns a null (length -1, or compact length 0) into ``None`` for any string,
bytes or array field, nullable or not, and it reads compact strings of any
length. Kafka refuses both while parsing ("non-nullable field ... was
serialized as null", "string field ... had invalid length"). This module does
the same from the message schemas themselves, so no handler has to guard
every field against ``None`` and no oversized string reaches a response (a
non-flexible response writes string lengths as int16 and would fail to
encode it).

A refused request is answered with INVALID_REQUEST when its response has a
top-level error code; otherwise the connection is closed, as Kafka closes a
connection whose request does not parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kafka.protocol.schemas.fields.codecs import String

from streambus.errors import InvalidRequestError
from streambus.groups.offsets import OFFSETS_TOPIC

if TYPE_CHECKING:
    from streambus.broker import Broker

# Kafka's limit for any string field: its length must fit an int16.
MAX_STRING_BYTES = 32767

# Topics only the broker writes, creates and deletes (Kafka's Topic.INTERNAL_TOPICS).
# Their names are reserved even before the broker creates them, so no client can
# create one first with settings of its own.
INTERNAL_TOPICS = frozenset({OFFSETS_TOPIC, "__transaction_state"})

# One field's check: the value, the field's path for the message; the problem or None.
_Check = Callable[[Any, str], str | None]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    response: Any | None  # an INVALID_REQUEST response to send, or None: close the connection


def check_request(
    request_cls: Any, response_cls: Any, request: Any, version: int
) -> Refusal | None:
    """None if ``request`` (decoded at ``version``) keeps to its schema, else how to refuse it."""
    problem = _struct_checker(request_cls._struct, version)(request, "")
    if problem is None:
        return None
    return Refusal(problem, error_response(response_cls, version, InvalidRequestError.errno))


def error_response(response_cls: Any, version: int, error_code: int) -> Any | None:
    """A response carrying only ``error_code`` at the top, if this version has a place for one."""
    names = {f.name for f in response_cls._struct.untagged_fields(version)}
    if "error_code" not in names:
        return None
    # Every other field takes its schema default (empty lists, empty strings, -1s as specified).
    return response_cls(error_code=error_code)


def is_internal_topic(broker: Broker, name: str) -> bool:
    if name in INTERNAL_TOPICS:
        return True
    meta = broker.logs.topics().get(name)
    return meta is not None and meta.internal


_CACHE: dict[tuple[int, int], _Check] = {}


def _struct_checker(struct: Any, version: int) -> _Check:
    key = (id(struct), version)
    checker = _CACHE.get(key)
    if checker is None:
        checker = _build_struct(struct, version)
        _CACHE[key] = checker
    return checker


def _build_struct(struct: Any, version: int) -> _Check:
    fields: list[tuple[str, _Check]] = []
    for field in struct.untagged_fields(version):
        field_check = _field_checker(field, version)
        if field_check is not None:
            fields.append((field.name, field_check))
    tagged: dict[str, _Check] = {}
    for field in struct.tagged_fields(version)._fields:
        field_check = _field_checker(field, version)
        if field_check is not None:
            tagged[field.name] = field_check

    def check(obj: Any, path: str) -> str | None:
        prefix = f"{path}." if path else ""
        for name, field_check in fields:
            problem = field_check(getattr(obj, name), prefix + name)
            if problem is not None:
                return problem
        for name in obj.tags or ():
            tag_check = tagged.get(name)
            if tag_check is not None:
                problem = tag_check(getattr(obj, name), prefix + name)
                if problem is not None:
                    return problem
        return None

    return check


def _field_checker(field: Any, version: int) -> _Check | None:
    """The check for one field, or None when no value of its type can break a handler."""
    nullable = field.nullable_for_version_q(version)
    if field.is_struct_array():
        inner = _struct_checker(field.array_of, version)
        return _array(nullable, inner)
    if field.is_array():
        element = _simple_checker(field.array_of, nullable=False)
        return _array(nullable, element)
    if field.is_struct():
        inner = _struct_checker(field, version)
        return _nullable(nullable, inner)
    return _simple_checker(field, nullable=nullable)


def _simple_checker(field: Any, *, nullable: bool) -> _Check | None:
    kind = getattr(field, "_type", None)
    if isinstance(kind, String):
        return _string(nullable)
    if field.type_str in ("bytes", "records"):
        return None if nullable else _not_null
    return None  # fixed-size numbers and uuids: every bit pattern is a value


def _not_null(value: Any, path: str) -> str | None:
    return f"non-nullable field {path} was null" if value is None else None


def _string(nullable: bool) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if value is None:
            return None if nullable else f"non-nullable field {path} was null"
        # UTF-8 takes at most 3 bytes per code point of the BMP, 4 beyond it;
        # only long strings pay for the exact count.
        if len(value) * 4 > MAX_STRING_BYTES and len(value.encode()) > MAX_STRING_BYTES:
            return f"string field {path} is longer than {MAX_STRING_BYTES} bytes"
        return None

    return check


def _array(nullable: bool, element: _Check | None) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if value is None:
            return None if nullable else f"non-nullable field {path} was null"
        if element is not None:
            for i, item in enumerate(value):
                problem = element(item, f"{path}[{i}]")
                if problem is not None:
                    return problem
        return None

    return check


def _nullable(nullable: bool, inner: _Check) -> _Check:
    def check(value: Any, path: str) -> str | None:
        if value is None:
            return None if nullable else f"non-nullable field {path} was null"
        return inner(value, path)

    return check
