"""Per-topic configuration, named the way Kafka names it.

A :class:`TopicConfig` is immutable. Broker-wide defaults are one instance;
a topic created with CreateTopics configs gets ``defaults.with_overrides(...)``
and only the overrides are persisted, so changing a broker default reaches
every topic that did not set the key itself.

Every topic config Apache Kafka 4.4 defines is a field here, so a topic created
or altered by a Kafka tool never fails on a name StreamBus does not know. Those
in :data:`APPLIED` change what the broker does; the others are validated as
Kafka validates them, stored and described, and change nothing (``SPECS`` says
which). Each has its broker-wide synonym (``log.retention.ms`` for
``retention.ms``), the name DescribeConfigs gives the broker default and the
name a dynamic broker config sets it by.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any

from streambus.errors import InvalidConfigError

_NEVER = 9223372036854775807  # Kafka's Long.MAX_VALUE: "never" for flush.* settings
_INT_MAX = 2147483647
_LONG_MIN = -9223372036854775808


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


class ConfigType(enum.IntEnum):
    """DescribeConfigs' ConfigType (v3+), Kafka's ``ConfigDef.Type`` numbered."""

    UNKNOWN = 0
    BOOLEAN = 1
    STRING = 2
    INT = 3
    SHORT = 4
    LONG = 5
    DOUBLE = 6
    LIST = 7
    CLASS = 8
    PASSWORD = 9


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
    # Kafka's other topic configs: validated and stored, not applied (see APPLIED).
    compression_type: str = "producer"
    compression_gzip_level: int = -1
    compression_lz4_level: int = 9
    compression_zstd_level: int = 3
    segment_jitter_ms: int = 0
    segment_index_bytes: int = 10485760
    file_delete_delay_ms: int = 60000
    max_compaction_lag_ms: int = _NEVER
    min_cleanable_dirty_ratio: float = 0.5
    max_decompressed_message_bytes: int = 2147483639
    preallocate: bool = False
    message_timestamp_before_max_ms: int = _NEVER
    message_timestamp_after_max_ms: int = 3600000
    leader_replication_throttled_replicas: str = ""
    follower_replication_throttled_replicas: str = ""
    remote_storage_enable: bool = False
    local_retention_ms: int = -2
    local_retention_bytes: int = -2
    remote_log_copy_disable: bool = False
    remote_copy_lag_ms: int = 0
    remote_copy_lag_bytes: int = -1
    remote_log_delete_on_disable: bool = False
    errors_deadletterqueue_group_enable: bool = False

    @property
    def compression_codec(self) -> int | None:
        """The codec batches are stored in (a batch's attribute bits), None for
        ``producer``: each batch kept as its producer compressed it."""
        return _CODECS.get(self.compression_type)

    def compression_level(self, codec: int) -> int:
        """The topic's ``compression.<codec>.level`` (0 for codecs without levels)."""
        levels = {
            1: self.compression_gzip_level,
            3: self.compression_lz4_level,
            4: self.compression_zstd_level,
        }
        return levels.get(codec, 0)

    def with_overrides(self, kafka_configs: Mapping[str, str | None]) -> TopicConfig:
        """A copy with Kafka-named overrides applied; unknown or invalid ones raise."""
        changes: dict[str, Any] = {}
        for key, raw in kafka_configs.items():
            field = KAFKA_NAMES.get(key)
            if field is None:
                raise InvalidConfigError(f"unknown topic config {key!r}")
            if raw is None:
                continue
            changes[field] = parse_value(key, raw)
        return dataclasses.replace(self, **changes)

    def overrides_from(self, base: TopicConfig) -> dict[str, str]:
        """The Kafka-named settings where this config differs from ``base``."""
        out: dict[str, str] = {}
        for key, field in KAFKA_NAMES.items():
            mine, theirs = getattr(self, field), getattr(base, field)
            if mine != theirs:
                out[key] = render(mine)
        return out

    def to_kafka(self) -> dict[str, str]:
        return {key: render(getattr(self, field)) for key, field in KAFKA_NAMES.items()}


# compression.type -> the codec's attribute bits (producer: keep each batch's own)
_CODECS = {"uncompressed": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}

KAFKA_NAMES: dict[str, str] = {
    f.name.replace("_", "."): f.name for f in dataclasses.fields(TopicConfig)
}

# The topic configs StreamBus acts on; every other one is stored and described only.
APPLIED = frozenset(
    {
        "retention.ms",
        "retention.bytes",
        "segment.bytes",
        "segment.ms",
        "cleanup.policy",
        "max.message.bytes",
        "flush.messages",
        "flush.ms",
        "delete.retention.ms",
        "min.compaction.lag.ms",
        "index.interval.bytes",
        "message.timestamp.type",
        "min.insync.replicas",
        "unclean.leader.election.enable",
        "compression.type",
        "compression.gzip.level",
        "compression.lz4.level",
        "compression.zstd.level",
        "confluent.key.schema.validation",
        "confluent.value.schema.validation",
        "confluent.key.subject.name.strategy",
        "confluent.value.subject.name.strategy",
        "streambus.key.schema.validation.mode",
        "streambus.value.schema.validation.mode",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigSpec:
    """How one Kafka topic config is typed, bounded and named at the broker level."""

    name: str
    kind: ConfigType
    synonym: str | None  # the broker-wide default's name (Kafka's ServerTopicConfigSynonyms)
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    choices: tuple[str, ...] = ()  # a STRING's allowed values
    check: Callable[[str, Any], None] | None = None  # further checks of the parsed value


def _throttled(key: str, value: Any) -> None:
    """Kafka's list validator: ``*``, or ``partition:broker`` pairs."""
    text = str(value).strip()
    if text in ("", "*"):
        return
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidConfigError(
                f"{key} must be * or a list of [partitionId]:[brokerId], got {text!r}"
            )


def _gzip_level(key: str, value: Any) -> None:
    if value != -1 and not 1 <= value <= 9:
        raise InvalidConfigError(f"{key} must be -1 or 1-9, got {value}")


def _no_tiered_storage(key: str, value: Any) -> None:
    if value:
        raise InvalidConfigError(
            f"{key}=true needs tiered storage, which StreamBus does not have "
            "(Kafka's remote.log.storage.system.enable)"
        )


_I, _L, _B = ConfigType.INT, ConfigType.LONG, ConfigType.BOOLEAN
_SPEC_LIST = [
    # StreamBus keeps lower floors than Kafka for segment.bytes (Kafka: 1 MiB), so small
    # segments stay possible for tests and tiny deployments.
    ConfigSpec("retention.ms", _L, "log.retention.ms", low=-1),
    ConfigSpec("retention.bytes", _L, "log.retention.bytes", low=-1),
    ConfigSpec("segment.bytes", _I, "log.segment.bytes", low=1),
    ConfigSpec("segment.ms", _L, "log.roll.ms", low=1),
    ConfigSpec("cleanup.policy", ConfigType.LIST, "log.cleanup.policy"),
    ConfigSpec("max.message.bytes", _I, "message.max.bytes", low=1),
    ConfigSpec("flush.messages", _L, "log.flush.interval.messages", low=1),
    ConfigSpec("flush.ms", _L, "log.flush.interval.ms", low=0),
    ConfigSpec("delete.retention.ms", _L, "log.cleaner.delete.retention.ms", low=0),
    ConfigSpec("min.compaction.lag.ms", _L, "log.cleaner.min.compaction.lag.ms", low=0),
    ConfigSpec("index.interval.bytes", _I, "log.index.interval.bytes", low=0),
    ConfigSpec(
        "message.timestamp.type",
        ConfigType.STRING,
        "log.message.timestamp.type",
        choices=("CreateTime", "LogAppendTime"),
    ),
    ConfigSpec("min.insync.replicas", _I, "min.insync.replicas", low=1),
    ConfigSpec("unclean.leader.election.enable", _B, "unclean.leader.election.enable"),
    # Confluent Server's schema validation configs, and StreamBus's mode beside them
    ConfigSpec("confluent.key.schema.validation", _B, None),
    ConfigSpec("confluent.value.schema.validation", _B, None),
    ConfigSpec("confluent.key.subject.name.strategy", ConfigType.STRING, None),
    ConfigSpec("confluent.value.subject.name.strategy", ConfigType.STRING, None),
    ConfigSpec("streambus.key.schema.validation.mode", ConfigType.STRING, None),
    ConfigSpec("streambus.value.schema.validation.mode", ConfigType.STRING, None),
    ConfigSpec(
        "compression.type",
        ConfigType.STRING,
        "compression.type",
        choices=("uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"),
    ),
    ConfigSpec("compression.gzip.level", _I, "compression.gzip.level", check=_gzip_level),
    ConfigSpec("compression.lz4.level", _I, "compression.lz4.level", low=1, high=17),
    ConfigSpec("compression.zstd.level", _I, "compression.zstd.level", low=-131072, high=22),
    ConfigSpec("segment.jitter.ms", _L, "log.roll.jitter.ms", low=0),
    ConfigSpec("segment.index.bytes", _I, "log.index.size.max.bytes", low=4),
    ConfigSpec("file.delete.delay.ms", _L, "log.segment.delete.delay.ms", low=0),
    ConfigSpec("max.compaction.lag.ms", _L, "log.cleaner.max.compaction.lag.ms", low=1),
    ConfigSpec(
        "min.cleanable.dirty.ratio",
        ConfigType.DOUBLE,
        "log.cleaner.min.cleanable.ratio",
        low=0,
        high=1,
    ),
    ConfigSpec(
        "max.decompressed.message.bytes",
        _I,
        "max.decompressed.message.bytes",
        low=1,
        high=2147483639,
    ),
    ConfigSpec("preallocate", _B, "log.preallocate"),
    ConfigSpec("message.timestamp.before.max.ms", _L, "log.message.timestamp.before.max.ms", low=0),
    ConfigSpec("message.timestamp.after.max.ms", _L, "log.message.timestamp.after.max.ms", low=0),
    ConfigSpec("leader.replication.throttled.replicas", ConfigType.LIST, None, check=_throttled),
    ConfigSpec("follower.replication.throttled.replicas", ConfigType.LIST, None, check=_throttled),
    ConfigSpec("remote.storage.enable", _B, None, check=_no_tiered_storage),
    ConfigSpec("local.retention.ms", _L, "log.local.retention.ms", low=-2),
    ConfigSpec("local.retention.bytes", _L, "log.local.retention.bytes", low=-2),
    ConfigSpec("remote.log.copy.disable", _B, None),
    ConfigSpec("remote.copy.lag.ms", _L, "log.remote.copy.lag.ms", low=-1),
    ConfigSpec("remote.copy.lag.bytes", _L, "log.remote.copy.lag.bytes", low=-1),
    ConfigSpec("remote.log.delete.on.disable", _B, None),
    ConfigSpec("errors.deadletterqueue.group.enable", _B, None),
]
SPECS: dict[str, ConfigSpec] = {spec.name: spec for spec in _SPEC_LIST}

# Broker-level name -> topic config name: what a dynamic broker config may set.
BROKER_SYNONYMS: dict[str, str] = {
    spec.synonym: spec.name for spec in _SPEC_LIST if spec.synonym is not None
}

_DEFAULTS = TopicConfig()


def default_value(key: str) -> str:
    """Kafka's (and StreamBus's) built-in default of a topic config, rendered."""
    return render(getattr(_DEFAULTS, KAFKA_NAMES[key]))


def with_dynamic_defaults(
    static: TopicConfig, broker_configs: Mapping[str, Mapping[str, str]], broker_id: int
) -> TopicConfig:
    """A broker's topic defaults: its static ones, under the cluster's dynamic default
    (entity ""), under its own dynamic broker configs (entity ``broker_id``)."""
    dynamic: dict[str, str] = {}
    for entity in ("", str(broker_id)):
        for key, value in broker_configs.get(entity, {}).items():
            dynamic[BROKER_SYNONYMS[key]] = value
    return static.with_overrides(dynamic)


def parse_value(key: str, raw: str) -> Any:
    """``raw`` as the field's type, checked as Kafka checks it (InvalidConfigError)."""
    schema_parser = _SCHEMA_PARSERS.get(KAFKA_NAMES[key])
    if schema_parser is not None:
        return schema_parser(key, raw)
    spec = SPECS[key]
    text = raw.strip()
    value: Any
    if key == "cleanup.policy":
        return CleanupPolicy.parse(text)
    if key == "message.timestamp.type":
        try:
            return TimestampType(text)
        except ValueError:
            raise InvalidConfigError(
                f"{key} must be CreateTime or LogAppendTime, got {raw!r}"
            ) from None
    if spec.kind is ConfigType.BOOLEAN:
        if text.lower() not in ("true", "false"):
            raise InvalidConfigError(f"{key} must be true or false, got {raw!r}")
        value = text.lower() == "true"
    elif spec.kind in (ConfigType.INT, ConfigType.LONG):
        try:
            value = int(text)
        except ValueError:
            raise InvalidConfigError(f"{key} must be an integer, got {raw!r}") from None
        top = _INT_MAX if spec.kind is ConfigType.INT else _NEVER
        bottom = -_INT_MAX - 1 if spec.kind is ConfigType.INT else _LONG_MIN
        if not bottom <= value <= top:
            raise InvalidConfigError(f"{key} is out of range for a {spec.kind.name}: {value}")
    elif spec.kind is ConfigType.DOUBLE:
        try:
            value = float(text)
        except ValueError:
            raise InvalidConfigError(f"{key} must be a number, got {raw!r}") from None
        if math.isnan(value):
            raise InvalidConfigError(f"{key} must be a number, got {raw!r}")
    else:
        value = text
        if spec.choices and value not in spec.choices:
            raise InvalidConfigError(f"{key} must be one of {', '.join(spec.choices)}, got {raw!r}")
    if spec.low is not None and value < spec.low:
        raise InvalidConfigError(f"{key} must be at least {_number(spec.low)}, got {raw.strip()}")
    if spec.high is not None and value > spec.high:
        raise InvalidConfigError(f"{key} must be at most {_number(spec.high)}, got {raw.strip()}")
    if spec.check is not None:
        spec.check(key, value)
    return value


def _number(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else str(bound)


def render(value: Any) -> str:
    """A value as Kafka spells it in configs."""
    if isinstance(value, bool):  # Kafka's spelling, not Python's
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)
