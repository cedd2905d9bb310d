"""Topics on disk and the partition logs of every one of them.

Layout under the broker's data directory::

    data_dir/topics/<topic>/topic.json      name, topic_id, partitions, overrides,
                                            internal, created_ms (written atomically)
    data_dir/topics/<topic>/<partition>/    that partition's segments (see segment.py)
    data_dir/topics/<topic>.<hex>-delete/   a topic being deleted; removed on sight

``topic.json`` holds only the Kafka-named overrides, so a topic's effective
configuration is always ``defaults.with_overrides(overrides)``: changing a
broker default reaches every topic that did not set the key itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from streambus.errors import (
    InvalidPartitionsError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from streambus.storage.log import PartitionLog
from streambus.storage.segment import fsync_dir
from streambus.structs import TopicPartition
from streambus.topic_config import TopicConfig

log = logging.getLogger("streambus.storage")

MAX_TOPIC_NAME = 249  # Kafka's limit: leaves room for suffixes in a 255-byte file name
_LEGAL_NAME = re.compile(r"[a-zA-Z0-9._-]+")
_DELETING = re.compile(r".+\.[0-9a-f]{32}-delete")
_META_FILE = "topic.json"


@dataclass(frozen=True)
class TopicMeta:
    name: str
    topic_id: uuid.UUID
    partitions: int
    overrides: Mapping[str, str]
    internal: bool = False
    created_ms: int = field(default=0, compare=False)


class MaintenanceReport(NamedTuple):
    segments_deleted: int
    compactions: int


def validate_topic_name(name: str) -> None:
    """Kafka's rules (org.apache.kafka.common.internals.Topic.validate)."""
    if not name:
        raise InvalidTopicError("topic name is empty")
    if name in (".", ".."):
        raise InvalidTopicError(f"topic name cannot be {name!r}")
    if len(name) > MAX_TOPIC_NAME:
        raise InvalidTopicError(
            f"topic name is {len(name)} characters long, the maximum is {MAX_TOPIC_NAME}"
        )
    if not _LEGAL_NAME.fullmatch(name):
        raise InvalidTopicError(
            f"topic name {name!r} has characters other than ASCII alphanumerics, '.', '_' and '-'"
        )


def _write_json_atomically(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_meta(path: Path) -> TopicMeta:
    raw = json.loads(path.read_text(encoding="utf-8"))
    overrides = raw["overrides"]
    if not isinstance(overrides, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in overrides.items()
    ):
        raise ValueError("overrides must map strings to strings")
    partitions = int(raw["partitions"])
    if partitions < 1:
        raise ValueError(f"partitions is {partitions}")
    return TopicMeta(
        name=str(raw["name"]),
        topic_id=uuid.UUID(raw["topic_id"]),
        partitions=partitions,
        overrides=MappingProxyType(dict(overrides)),
        internal=bool(raw.get("internal", False)),
        created_ms=int(raw.get("created_ms", 0)),
    )


class _Topic:
    __slots__ = ("config", "logs", "meta")

    def __init__(self, meta: TopicMeta, config: TopicConfig, logs: list[PartitionLog]) -> None:
        self.meta = meta
        self.config = config
        self.logs = logs


class LogManager:
    """Every topic's metadata and partition logs under one data directory."""

    def __init__(
        self, data_dir: Path, defaults: TopicConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.data_dir = data_dir
        self.defaults = defaults
        self._clock = clock
        self._root = data_dir / "topics"
        self._topics: dict[str, _Topic] = {}

    def load(self) -> None:
        """Open every topic found on disk; a directory without valid metadata is skipped."""
        self._root.mkdir(parents=True, exist_ok=True)
        for topic_dir in sorted(self._root.iterdir()):
            if not topic_dir.is_dir() or topic_dir.name in self._topics:
                continue
            meta_path = topic_dir / _META_FILE
            try:
                meta = _read_meta(meta_path)
                if meta.name != topic_dir.name:
                    raise ValueError(f"names topic {meta.name!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if _DELETING.fullmatch(topic_dir.name):  # a delete interrupted by a crash
                    shutil.rmtree(topic_dir, ignore_errors=True)
                    continue
                log.error("skipping %s: no valid %s (%s)", topic_dir, _META_FILE, exc)
                continue
            try:
                config = self.defaults.with_overrides(meta.overrides)
            except Exception as exc:
                log.error("skipping %s: invalid overrides (%s)", topic_dir, exc)
                continue
            self._open_topic(meta, config)

    def _open_topic(self, meta: TopicMeta, config: TopicConfig) -> None:
        topic_dir = self._root / meta.name
        logs = [
            PartitionLog.open(topic_dir / str(p), config, clock=self._clock)
            for p in range(meta.partitions)
        ]
        self._topics[meta.name] = _Topic(meta, config, logs)

    def validate_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        internal: bool = False,
    ) -> TopicMeta:
        """What ``create_topic`` would create, raising what it would raise; creates nothing
        (CreateTopics with validate_only)."""
        validate_topic_name(name)
        if name in self._topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        collision = name.replace(".", "_")
        for existing in self._topics:
            if existing.replace(".", "_") == collision:
                # Metric names map '.' to '_', so Kafka refuses topics differing only there.
                raise InvalidTopicError(f"topic {name!r} collides with existing topic {existing!r}")
        if partitions < 1:
            raise InvalidPartitionsError(
                f"number of partitions must be at least 1, got {partitions}"
            )
        self.defaults.with_overrides(overrides)  # raises InvalidConfigError
        kept = {key: value for key, value in overrides.items() if value is not None}
        return TopicMeta(
            name=name,
            topic_id=uuid.uuid4(),
            partitions=partitions,
            overrides=MappingProxyType(kept),
            internal=internal,
            created_ms=int(self._clock() * 1000),
        )

    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        internal: bool = False,
    ) -> TopicMeta:
        meta = self.validate_topic(name, partitions, overrides, internal=internal)
        kept = dict(meta.overrides)
        config = self.defaults.with_overrides(kept)
        topic_dir = self._root / name
        if topic_dir.exists():  # debris without valid metadata, already reported by load
            raise TopicAlreadyExistsError(f"directory {topic_dir} already exists")
        topic_dir.mkdir(parents=True)
        _write_json_atomically(
            topic_dir / _META_FILE,
            {
                "name": name,
                "topic_id": str(meta.topic_id),
                "partitions": partitions,
                "overrides": kept,
                "internal": internal,
                "created_ms": meta.created_ms,
            },
        )
        self._open_topic(meta, config)
        log.info("created topic %s with %d partitions, overrides %s", name, partitions, kept)
        return meta

    def delete_topic(self, name: str) -> None:
        topic = self._topics.pop(name, None)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        for plog in topic.logs:
            plog.close()
        topic_dir = self._root / name
        doomed = self._root / f"{name}.{uuid.uuid4().hex}-delete"
        # After the rename a crash cannot resurrect the topic: load() removes the debris.
        os.replace(topic_dir, doomed)
        fsync_dir(self._root)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("deleted topic %s", name)

    def topics(self) -> Mapping[str, TopicMeta]:
        return MappingProxyType({name: topic.meta for name, topic in self._topics.items()})

    def topic_config(self, name: str) -> TopicConfig:
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        return topic.config

    def log(self, tp: TopicPartition) -> PartitionLog:
        topic = self._topics.get(tp.topic)
        if topic is None or not 0 <= tp.partition < len(topic.logs):
            raise UnknownTopicOrPartitionError(f"unknown partition {tp.topic}-{tp.partition}")
        return topic.logs[tp.partition]

    def logs(self) -> Iterator[tuple[TopicPartition, PartitionLog]]:
        for name, topic in list(self._topics.items()):
            for partition, plog in enumerate(topic.logs):
                yield TopicPartition(name, partition), plog

    def flush_all(self) -> None:
        for _, plog in self.logs():
            plog.flush()

    def close(self) -> None:
        for _, plog in self.logs():
            plog.close()
        self._topics.clear()

    def maintenance(self, now_ms: int) -> MaintenanceReport:
        """Retention, compaction and time-based flushing for every log.

        A failing log is reported and skipped so the others still get their turn.
        """
        deleted = compactions = 0
        for tp, plog in self.logs():
            try:
                deleted += plog.enforce_retention(now_ms)
                compactions += plog.compact(now_ms)
                plog.maybe_flush(now_ms)
            except Exception:
                log.exception("maintenance of %s-%d failed", tp.topic, tp.partition)
        return MaintenanceReport(deleted, compactions)

    def total_size_bytes(self) -> int:
        return sum(plog.size_bytes for _, plog in self.logs())

    def total_segments(self) -> int:
        return sum(plog.segment_count for _, plog in self.logs())
