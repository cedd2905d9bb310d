"""PROTOBUF: a ``.proto`` text (parsed by ``proto-schema-parser``) or, as Confluent's own
serializers send it, a base64 ``FileDescriptorProto``; both reduce to one model of messages
and fields by number, compared with Confluent's protobuf rules at a practical level.

Rules applied (reader = the schema that reads, writer = the one that wrote the data):
SYNTAX_VERSION_CHANGED, PACKAGE_CHANGED, MESSAGE_REMOVED, REQUIRED_FIELD_ADDED and
REQUIRED_FIELD_REMOVED (proto2 ``required``), FIELD_KIND_CHANGED (scalar to message, a
scalar kind outside its wire-compatible group, another message or enum type),
FIELD_LABEL_CHANGED (singular to repeated) and MULTIPLE_FIELDS_MOVED_TO_ONEOF are
incompatible; adding or removing an optional field and renaming a field are not.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from proto_schema_parser import ast
from proto_schema_parser.generator import Generator
from proto_schema_parser.parser import Parser

from streambus.schemas.errors import InvalidSchemaError

PROTOBUF = "PROTOBUF"

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
# Scalar kinds that read each other's wire values (Confluent's compatible groups).
_GROUPS = (
    frozenset({"int32", "uint32", "int64", "uint64", "bool"}),
    frozenset({"sint32", "sint64"}),
    frozenset({"fixed32", "sfixed32"}),
    frozenset({"fixed64", "sfixed64"}),
    frozenset({"string", "bytes"}),
)
SCALARS = frozenset().union(*_GROUPS) | {"double", "float"}
_FD = descriptor_pb2.FieldDescriptorProto


@dataclass(frozen=True, slots=True)
class ProtoField:
    name: str
    kind: str  # a scalar name, map<k,v>, or a message/enum name without the package
    label: str  # "optional" | "required" | "repeated"
    oneof: str | None


@dataclass(slots=True)
class ProtoModel:
    syntax: str = "proto2"
    package: str = ""
    messages: dict[str, dict[int, ProtoField]] = field(default_factory=dict)


class _RaiseOnError:
    """An ANTLR error listener: the parser's default prints and recovers; a registry refuses."""

    def syntaxError(self, _r: Any, _s: Any, line: int, column: int, msg: str, _e: Any) -> None:  # noqa: N802
        raise InvalidSchemaError(f"Invalid schema: line {line}:{column} {msg}")

    def reportAmbiguity(self, *_: Any) -> None:  # noqa: N802
        pass

    def reportAttemptingFullContext(self, *_: Any) -> None:  # noqa: N802
        pass

    def reportContextSensitivity(self, *_: Any) -> None:  # noqa: N802
        pass


def _quiet(recognizer: Any) -> None:
    recognizer.removeErrorListeners()
    recognizer.addErrorListener(_RaiseOnError())


class ProtobufSchema:
    schema_type = PROTOBUF

    def __init__(self, text: str, model: ProtoModel, tree: ast.File | None) -> None:
        self._text = text
        self.model = model
        self._tree = tree

    @classmethod
    def parse(cls, text: str) -> ProtobufSchema:
        stripped = text.strip()
        if stripped and _BASE64.match(stripped) and "syntax" not in stripped:
            return cls(text, _from_descriptor(_decode_descriptor(stripped)), None)
        try:
            tree = Parser(setup_lexer=_quiet, setup_parser=_quiet).parse(text)
        except InvalidSchemaError:
            raise
        except Exception as exc:  # the parser's own failures on input it cannot walk
            raise InvalidSchemaError(f"Invalid schema: {exc}") from None
        return cls(text, _from_tree(tree), tree)

    def normalized(self) -> str:
        if self._tree is None:
            return self._text.strip()
        text: str = Generator().generate(self._tree)
        return text

    def incompatibilities(self, writer: object) -> list[str]:
        if not isinstance(writer, ProtobufSchema):
            return [f"schema type changed from {getattr(writer, 'schema_type', '?')} to PROTOBUF"]
        return _compare(self.model, writer.model)


def _decode_descriptor(text: str) -> descriptor_pb2.FileDescriptorProto:
    try:
        raw = base64.b64decode(text, validate=False)
        proto = descriptor_pb2.FileDescriptorProto()
        proto.ParseFromString(raw)
    except (binascii.Error, DecodeError, ValueError) as exc:
        raise InvalidSchemaError(f"Invalid schema: not a FileDescriptorProto: {exc}") from None
    if not proto.message_type and not proto.enum_type:
        raise InvalidSchemaError("Invalid schema: the descriptor declares no message or enum")
    return proto


def _short(name: str, package: str) -> str:
    name = name.lstrip(".")
    if package and name.startswith(package + "."):
        return name[len(package) + 1 :]
    return name


def _from_descriptor(proto: descriptor_pb2.FileDescriptorProto) -> ProtoModel:
    model = ProtoModel(proto.syntax or "proto2", proto.package)
    labels = {_FD.LABEL_OPTIONAL: "optional", _FD.LABEL_REQUIRED: "required"}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        full = prefix + message.name
        maps = {full + "." + n.name: n for n in message.nested_type if n.options.map_entry}
        fields: dict[int, ProtoField] = {}
        for f in message.field:
            kind = _FD.Type.Name(f.type)[len("TYPE_") :].lower()
            label = labels.get(f.label, "repeated")
            if f.type in (_FD.TYPE_MESSAGE, _FD.TYPE_ENUM, _FD.TYPE_GROUP):
                kind = _short(f.type_name, proto.package)
                entry = maps.get(kind)
                if entry is not None:
                    k, v = (_kind_of(x, proto.package) for x in entry.field)
                    kind, label = f"map<{k},{v}>", "optional"
            oneof = None
            if f.HasField("oneof_index") and not f.proto3_optional:
                oneof = message.oneof_decl[f.oneof_index].name
            fields[f.number] = ProtoField(f.name, kind, label, oneof)
        model.messages[full] = fields
        for nested in message.nested_type:
            if not nested.options.map_entry:
                walk(nested, full + ".")

    for message in proto.message_type:
        walk(message, "")
    return model


def _kind_of(f: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if f.type in (_FD.TYPE_MESSAGE, _FD.TYPE_ENUM):
        return _short(f.type_name, package)
    return str(_FD.Type.Name(f.type))[len("TYPE_") :].lower()


def _from_tree(tree: ast.File) -> ProtoModel:
    model = ProtoModel(tree.syntax or "proto2")
    for element in tree.file_elements:
        if isinstance(element, ast.Package):
            model.package = element.name
    labels = {
        ast.FieldCardinality.REPEATED: "repeated",
        ast.FieldCardinality.REQUIRED: "required",
    }

    def add(fields: dict[int, ProtoField], f: ast.Field, oneof: str | None) -> None:
        label = labels.get(f.cardinality, "optional") if f.cardinality else "optional"
        fields[f.number] = ProtoField(f.name, _short(f.type, model.package), label, oneof)

    def walk(message: ast.Message, prefix: str) -> None:
        full = prefix + message.name
        fields: dict[int, ProtoField] = {}
        for element in message.elements:
            if isinstance(element, ast.Field):
                add(fields, element, None)
            elif isinstance(element, ast.MapField):
                kind = f"map<{element.key_type},{_short(element.value_type, model.package)}>"
                fields[element.number] = ProtoField(element.name, kind, "optional", None)
            elif isinstance(element, ast.OneOf):
                for inner in element.elements:
                    if isinstance(inner, ast.Field):
                        add(fields, inner, element.name)
            elif isinstance(element, ast.Message):
                walk(element, full + ".")
        model.messages[full] = fields

    for element in tree.file_elements:
        if isinstance(element, ast.Message):
            walk(element, "")
    return model


def _scalar_compatible(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in _GROUPS)


def _compare(reader: ProtoModel, writer: ProtoModel) -> list[str]:
    out: list[str] = []
    if reader.syntax != writer.syntax:
        out.append(f"SYNTAX_VERSION_CHANGED: {writer.syntax} to {reader.syntax}")
    if reader.package != writer.package:
        out.append(f"PACKAGE_CHANGED: {writer.package!r} to {reader.package!r}")
    for name, w_fields in writer.messages.items():
        r_fields = reader.messages.get(name)
        if r_fields is None:
            out.append(f"MESSAGE_REMOVED: {name}")
            continue
        moved: dict[str, int] = {}
        for number, w in w_fields.items():
            r = r_fields.get(number)
            if r is None:
                if w.label == "required":
                    out.append(f"REQUIRED_FIELD_REMOVED: {name}.{w.name} ({number})")
                continue
            scalar = r.kind in SCALARS and w.kind in SCALARS
            if (scalar and not _scalar_compatible(r.kind, w.kind)) or (
                not scalar and r.kind != w.kind
            ):
                out.append(f"FIELD_KIND_CHANGED: {name}.{r.name} ({number}) {w.kind} to {r.kind}")
            if (r.label == "repeated") != (w.label == "repeated"):
                out.append(f"FIELD_LABEL_CHANGED: {name}.{r.name} ({number})")
            if r.oneof is not None and w.oneof is None:
                moved[r.oneof] = moved.get(r.oneof, 0) + 1
        for number, r in r_fields.items():
            if number not in w_fields and r.label == "required":
                out.append(f"REQUIRED_FIELD_ADDED: {name}.{r.name} ({number})")
        out.extend(
            f"MULTIPLE_FIELDS_MOVED_TO_ONEOF: {name}.{oneof}"
            for oneof, count in moved.items()
            if count > 1
        )
    return out


# -- a .proto text as a FileDescriptorProto (``format=serialized``) -----------------------
_SCALAR_TYPES = {name: _FD.Type.Value("TYPE_" + name.upper()) for name in SCALARS}
_LABELS = {
    "optional": _FD.LABEL_OPTIONAL,
    "required": _FD.LABEL_REQUIRED,
    "repeated": _FD.LABEL_REPEATED,
}


def serialized(schema: str, name: str = "default.proto") -> str:
    """The schema as Confluent's ``format=serialized`` answers it: a base64
    FileDescriptorProto (what Confluent's protobuf serializers parse)."""
    stripped = schema.strip()
    if stripped and _BASE64.match(stripped) and "syntax" not in stripped:
        return stripped
    tree = ProtobufSchema.parse(schema)._tree
    assert tree is not None
    return base64.b64encode(to_descriptor(tree, name).SerializeToString()).decode("ascii")


def to_descriptor(tree: ast.File, name: str) -> descriptor_pb2.FileDescriptorProto:
    """Messages, fields (maps and oneofs too), enums and imports of a parsed ``.proto``."""
    proto = descriptor_pb2.FileDescriptorProto(name=name, syntax=tree.syntax or "proto2")
    for element in tree.file_elements:
        if isinstance(element, ast.Package):
            proto.package = element.name
        elif isinstance(element, ast.Import):
            proto.dependency.append(element.name)
    enums: set[str] = set()
    messages: set[str] = set()

    def collect(elements: list[Any], prefix: str) -> None:
        for e in elements:
            if isinstance(e, ast.Enum):
                enums.add(prefix + e.name)
            elif isinstance(e, ast.Message):
                messages.add(prefix + e.name)
                collect(e.elements, prefix + e.name + ".")

    root = "." + proto.package + "." if proto.package else "."
    collect(tree.file_elements, root)

    def resolve(kind: str, scope: str) -> tuple[int, str]:
        if kind in _SCALAR_TYPES:
            return _SCALAR_TYPES[kind], ""
        if kind.startswith("."):
            full = kind
        else:
            full = "." + kind
            parts = scope.rstrip(".").split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i]) + "." + kind
                if candidate in enums or candidate in messages:
                    full = candidate
                    break
        return (_FD.TYPE_ENUM if full in enums else _FD.TYPE_MESSAGE), full

    def field(
        target: descriptor_pb2.DescriptorProto, f: ast.Field, scope: str, oneof: int | None
    ) -> None:
        kind, type_name = resolve(f.type, scope)
        label = "optional"
        if f.cardinality is ast.FieldCardinality.REPEATED:
            label = "repeated"
        elif f.cardinality is ast.FieldCardinality.REQUIRED:
            label = "required"
        out = target.field.add(name=f.name, number=f.number, type=kind, label=_LABELS[label])
        if type_name:
            out.type_name = type_name
        if oneof is not None:
            out.oneof_index = oneof
        elif f.cardinality is ast.FieldCardinality.OPTIONAL and proto.syntax == "proto3":
            out.proto3_optional = True  # a synthetic oneof, as protoc writes it
            out.oneof_index = len(target.oneof_decl)
            target.oneof_decl.add(name="_" + f.name)

    def enum(target: Any, e: ast.Enum) -> None:
        out = target.add(name=e.name)
        for v in e.elements:
            if isinstance(v, ast.EnumValue):
                out.value.add(name=v.name, number=v.number)

    def message(target: Any, m: ast.Message, scope: str) -> None:
        out = target.add(name=m.name)
        inner = scope + m.name + "."
        for e in m.elements:
            if isinstance(e, ast.Field):
                field(out, e, inner, None)
            elif isinstance(e, ast.OneOf):
                index = len(out.oneof_decl)
                out.oneof_decl.add(name=e.name)
                for f in e.elements:
                    if isinstance(f, ast.Field):
                        field(out, f, inner, index)
            elif isinstance(e, ast.MapField):
                entry_name = "".join(p.capitalize() for p in e.name.split("_")) + "Entry"
                entry = out.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                for number, (fname, kind) in enumerate(
                    (("key", e.key_type), ("value", e.value_type)), 1
                ):
                    ftype, tname = resolve(kind, inner)
                    f = entry.field.add(
                        name=fname, number=number, type=ftype, label=_FD.LABEL_OPTIONAL
                    )
                    if tname:
                        f.type_name = tname
                out.field.add(
                    name=e.name,
                    number=e.number,
                    type=_FD.TYPE_MESSAGE,
                    label=_FD.LABEL_REPEATED,
                    type_name=inner + entry_name,
                )
            elif isinstance(e, ast.Message):
                message(out.nested_type, e, inner)
            elif isinstance(e, ast.Enum):
                enum(out.enum_type, e)

    for element in tree.file_elements:
        if isinstance(element, ast.Message):
            message(proto.message_type, element, root)
        elif isinstance(element, ast.Enum):
            enum(proto.enum_type, element)
    return proto
