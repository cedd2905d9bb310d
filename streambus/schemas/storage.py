"""The registry's records in the compacted topic ``_schemas``, in Confluent's layout.

Keys and values are JSON, as Confluent Schema Registry writes them, so the topic can be
read by the same tools (and a registry's ``_schemas`` could be copied in):

  key   {"keytype":"SCHEMA","subject":S,"version":V,"magic":1}
  value {"subject":S,"version":V,"id":N,"schemaType":T,"schema":TEXT,
         "references":[{"name","subject","version"}],"deleted":false}
        null (a tombstone): version V of S was deleted permanently
  key   {"keytype":"CONFIG","subject":S|null,"magic":0}
  value {"compatibilityLevel":LEVEL}, null: the subject's level was removed
  key   {"keytype":"MODE","subject":S|null,"magic":0}
  value {"mode":MODE}
  key   {"keytype":"DELETE_SUBJECT","subject":S,"magic":0}
  value {"subject":S,"version":V}: versions up to V were soft-deleted together

Keys are written with a fixed field order and no spaces: compaction keeps the latest
record per key by its bytes. Records are appended through the partition service like
every write of the broker's own (``__consumer_offsets``), and read back in offset order up
to the high watermark, at start and as they arrive (``follower.SchemasTail``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from streambus.partitions import AppendOrigin, PartitionService
from streambus.records import build_batch, iter_records, walk_batches
from streambus.schemas.formats import SchemaReference
from streambus.structs import TopicPartition

log = logging.getLogger("streambus.schemas")

SCHEMAS_TOPIC = "_schemas"
SCHEMAS_PARTITION = TopicPartition(SCHEMAS_TOPIC, 0)
SCHEMAS_TOPIC_CONFIG = {"cleanup.policy": "compact"}
SCHEMAS_REPLICATION_FACTOR = 3  # at creation, or fewer when fewer brokers are live
_READ_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SchemaRecord:
    subject: str
    version: int
    schema_id: int
    schema_type: str
    schema: str
    references: tuple[SchemaReference, ...]
    deleted: bool


@dataclass(frozen=True, slots=True)
class SchemaTombstone:
    subject: str
    version: int


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    subject: str | None  # None: the global level
    level: str | None  # None: removed


@dataclass(frozen=True, slots=True)
class ModeRecord:
    subject: str | None
    mode: str | None


@dataclass(frozen=True, slots=True)
class DeleteSubjectRecord:
    subject: str
    version: int


Record = SchemaRecord | SchemaTombstone | ConfigRecord | ModeRecord | DeleteSubjectRecord


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode(record: Record) -> tuple[bytes, bytes | None]:
    if isinstance(record, SchemaRecord | SchemaTombstone):
        key = _dump(
            {"keytype": "SCHEMA", "subject": record.subject, "version": record.version, "magic": 1}
        )
        if isinstance(record, SchemaTombstone):
            return key, None
        return key, _dump(
            {
                "subject": record.subject,
                "version": record.version,
                "id": record.schema_id,
                "schemaType": record.schema_type,
                "schema": record.schema,
                "references": [r.to_json() for r in record.references],
                "deleted": record.deleted,
            }
        )
    if isinstance(record, ConfigRecord):
        key = _dump({"keytype": "CONFIG", "subject": record.subject, "magic": 0})
        value = None if record.level is None else _dump({"compatibilityLevel": record.level})
        return key, value
    if isinstance(record, ModeRecord):
        key = _dump({"keytype": "MODE", "subject": record.subject, "magic": 0})
        return key, None if record.mode is None else _dump({"mode": record.mode})
    key = _dump({"keytype": "DELETE_SUBJECT", "subject": record.subject, "magic": 0})
    return key, _dump({"subject": record.subject, "version": record.version})


def decode(key: bytes, value: bytes | None) -> Record | None:
    """The record a key/value pair holds; None for key types this registry does not use
    (Confluent's NOOP, CLEAR_SUBJECT, ...)."""
    k = json.loads(key)
    v = None if value is None else json.loads(value)
    keytype = k.get("keytype")
    subject = k.get("subject")
    if keytype == "SCHEMA":
        if v is None:
            return SchemaTombstone(subject, int(k["version"]))
        refs = tuple(
            SchemaReference(str(r["name"]), str(r["subject"]), int(r["version"]))
            for r in v.get("references") or ()
        )
        return SchemaRecord(
            str(v["subject"]),
            int(v["version"]),
            int(v["id"]),
            str(v.get("schemaType") or "AVRO"),
            str(v["schema"]),
            refs,
            bool(v.get("deleted", False)),
        )
    if keytype == "CONFIG":
        return ConfigRecord(subject, None if v is None else str(v["compatibilityLevel"]))
    if keytype == "MODE":
        return ModeRecord(subject, None if v is None else str(v["mode"]))
    if keytype == "DELETE_SUBJECT" and v is not None:
        return DeleteSubjectRecord(str(v["subject"]), int(v["version"]))
    return None


def decode_stored(
    key: bytes | memoryview | None, value: bytes | memoryview | None
) -> Record | None:
    """A stored record of ``_schemas``; None (an unreadable one logged) for what the
    registry does not use."""
    if key is None:
        return None
    try:
        return decode(bytes(key), _bytes(value))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("skipping unreadable record in %s: %s", SCHEMAS_TOPIC, exc)
        return None


class SchemasLog:
    """Appends records to ``_schemas`` partition 0 and reads them back."""

    def __init__(self, service: PartitionService) -> None:
        self.service = service

    def exists(self) -> bool:
        return SCHEMAS_TOPIC in self.service.topics()

    def append(self, records: list[Record]) -> int:
        """Append ``records`` as one batch (all or nothing); returns the next offset."""
        now = int(time.time() * 1000)
        batch = build_batch([(*encode(r), (), now) for r in records])
        result = self.service.append_now(SCHEMAS_PARTITION, batch, origin=AppendOrigin.COORDINATOR)
        return int(result.last_offset) + 1

    def read(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Record]]:
        """Every record from ``start`` to ``end`` (None: the high watermark), with the
        offset after it."""
        if not self.exists():
            return
        offsets = self.service.copy_offsets(SCHEMAS_PARTITION)
        end = offsets.high_watermark if end is None else end
        offset = max(start, offsets.log_start_offset)
        while offset < end:
            data = self.service.read_copy(SCHEMAS_PARTITION, offset, _READ_BYTES)
            if not data:
                break
            for pos, header in walk_batches(data):
                if header.base_offset >= end:
                    return
                for record in iter_records(data, pos, header):
                    if header.is_control:
                        continue
                    decoded = decode_stored(record.key, record.value)
                    if decoded is not None:
                        yield header.last_offset + 1, decoded
                offset = header.last_offset + 1


def _bytes(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
