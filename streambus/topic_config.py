"""Per-topic configuration, named the way Kafka names it.

A :class:`TopicConfig` is immutable. Broker-wide defaults are one instance;
a topic created with CreateTopics configs gets ``defaults.with_overrides(...)``
and only the overrides are persisted, so changing a broker default reaches
every topic that did not set the key itself.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from streambus.errors import InvalidConfigError

_NEVER = 9223372036854775807  # Kafka's Long.MAX_VALUE: "never" for flush.* settings


class CleanupPolicy(enum.Enum):
    DELETE = "delete"
    COMPACT = "compact"
    COMPACT_DELETE = "compact,delete"

    @property
    def deletes(self) -> bool:
        return self is not CleanupPolicy.COMPACT

    @property
    def compacts(self) -> bool:
        return self is not CleanupPolicy.DELETE

    @classmethod
    def parse(cls, text: str) -> CleanupPolicy:
        parts = sorted({p.strip() for p in text.split(",") if p.strip()})
        try:
            return cls(",".join(parts))
        except ValueError:
            raise InvalidConfigError(
                f"cleanup.policy must be delete, compact or compact,delete, got {text!r}"
            ) from None


class TimestampType(enum.Enum):
    CREATE_TIME = "CreateTime"
    LOG_APPEND_TIME = "LogAppendTime"


# -- schema validation of produced records (streambus.schemas.validation) -----------------
# Confluent Server's topic configs, and StreamBus's own mode beside them.
_STRATEGY_PACKAGE = "io.confluent.kafka.serializers.subject."


class SubjectNameStrategy(enum.Enum):
    """How a record's subject is named (Confluent's ``*.subject.name.strategy``)."""

    TOPIC = _STRATEGY_PACKAGE + "TopicNameStrategy"  # <topic>-key / <topic>-value
    RECORD = _STRATEGY_PACKAGE + "RecordNameStrategy"  # the schema's full record name
    TOPIC_RECORD = _STRATEGY_PACKAGE + "TopicRecordNameStrategy"  # <topic>-<record name>

    @classmethod
    def parse(cls, key: str, text: str) -> SubjectNameStrategy:
        """The class name with or without its package, as Confluent Server takes it."""
        short = text.strip().removeprefix(_STRATEGY_PACKAGE)
        for strategy in cls:
            if strategy.value.removeprefix(_STRATEGY_PACKAGE) == short:
                return strategy
        raise InvalidConfigError(
            f"{key} must be TopicNameStrategy, RecordNameStrategy or TopicRecordNameStrategy "
            f"(optionally prefixed with {_STRATEGY_PACKAGE}), got {text!r}"
        )


class SchemaValidationMode(enum.Enum):
    ID = "id"  # magic byte 0 and the id of a schema registered under the record's subject
    FULL = "full"  # that, and the payload decodes with that schema


def _parse_bool(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text not in ("true", "false"):
        raise InvalidConfigError(f"{key} must be true or false, got {raw!r}")
    return text == "true"


def _parse_mode(key: str, raw: str) -> SchemaValidationMode:
    try:
        return SchemaValidationMode(raw.strip().lower())
    except ValueError:
        raise InvalidConfigError(f"{key} must be id or full, got {raw!r}") from None


_SCHEMA_PARSERS: dict[str, Any] = {
    "confluent_key_schema_validation": _parse_bool,
    "confluent_value_schema_validation": _parse_bool,
    "confluent_key_subject_name_strategy": SubjectNameStrategy.parse,
    "confluent_value_subject_name_strategy": SubjectNameStrategy.parse,
    "streambus_key_schema_validation_mode": _parse_mode,
    "streambus_value_schema_validation_mode": _parse_mode,
}
# -- end of schema validation configs ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TopicConfig:
    retention_ms: int = 7 * 24 * 3600 * 1000  # -1: keep forever
    retention_bytes: int = -1  # per partition; -1: no size limit
    segment_bytes: int = 1024 * 1024 * 1024
    segment_ms: int = 7 * 24 * 3600 * 1000
    cleanup_policy: CleanupPolicy = CleanupPolicy.DELETE
    max_message_bytes: int = 1048588  # largest record batch accepted
    flush_messages: int = _NEVER  # fsync after this many messages
    flush_ms: int = _NEVER  # fsync when the oldest unflushed message is this old
    delete_retention_ms: int = 24 * 3600 * 1000  # how long compaction keeps tombstones
    min_compaction_lag_ms: int = 0
    index_interval_bytes: int = 4096
    message_timestamp_type: TimestampType = TimestampType.CREATE_TIME
    # acks=all is refused (NOT_ENOUGH_REPLICAS) while the ISR is smaller than this
    min_insync_replicas: int = 1
    # A partition with no live in-sync replica may be led by an out-of-sync one (data loss)
    unclean_leader_election_enable: bool = False
    # Schema validation of produced records (see streambus.schemas.validation)
    confluent_key_schema_validation: bool = False
    confluent_value_schema_validation: bool = False
    confluent_key_subject_name_strategy: SubjectNameStrategy = SubjectNameStrategy.TOPIC
    confluent_value_subject_name_strategy: SubjectNameStrategy = SubjectNameStrategy.TOPIC
    streambus_key_schema_validation_mode: SchemaValidationMode = SchemaValidationMode.ID
    streambus_value_schema_validation_mode: SchemaValidationMode = SchemaValidationMode.ID

    def with_overrides(self, kafka_configs: Mapping[str, str | None]) -> TopicConfig:
        """A copy with Kafka-named overrides applied; unknown or invalid ones raise."""
        changes: dict[str, Any] = {}
        for key, raw in kafka_configs.items():
            field = KAFKA_NAMES.get(key)
            if field is None:
                raise InvalidConfigError(f"unknown topic config {key!r}")
            if raw is None:
                continue
            changes[field] = _parse(key, field, raw)
        return dataclasses.replace(self, **changes)

    def overrides_from(self, base: TopicConfig) -> dict[str, str]:
        """The Kafka-named settings where this config differs from ``base``."""
        out: dict[str, str] = {}
        for key, field in KAFKA_NAMES.items():
            mine, theirs = getattr(self, field), getattr(base, field)
            if mine != theirs:
                out[key] = _render(mine)
        return out

    def to_kafka(self) -> dict[str, str]:
        return {key: _render(getattr(self, field)) for key, field in KAFKA_NAMES.items()}


KAFKA_NAMES: dict[str, str] = {
    f.name.replace("_", "."): f.name for f in dataclasses.fields(TopicConfig)
}


def _parse(key: str, field: str, raw: str) -> Any:
    schema_parser = _SCHEMA_PARSERS.get(field)
    if schema_parser is not None:
        return schema_parser(key, raw)
    if field == "cleanup_policy":
        return CleanupPolicy.parse(raw)
    if field == "message_timestamp_type":
        try:
            return TimestampType(raw)
        except ValueError:
            raise InvalidConfigError(
                f"{key} must be CreateTime or LogAppendTime, got {raw!r}"
            ) from None
    if field == "unclean_leader_election_enable":
        text = raw.strip().lower()
        if text not in ("true", "false"):
            raise InvalidConfigError(f"{key} must be true or false, got {raw!r}")
        return text == "true"
    try:
        value = int(raw)
    except ValueError:
        raise InvalidConfigError(f"{key} must be an integer, got {raw!r}") from None
    lowest = -1 if field in ("retention_ms", "retention_bytes") else 0
    if field in (
        "segment_bytes",
        "max_message_bytes",
        "flush_messages",
        "segment_ms",
        "min_insync_replicas",
    ):
        lowest = 1
    if value < lowest:
        raise InvalidConfigError(f"{key} must be at least {lowest}, got {value}")
    return value


def _render(value: Any) -> str:
    if isinstance(value, bool):  # Kafka's spelling, not Python's
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)
