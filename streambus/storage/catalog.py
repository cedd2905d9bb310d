"""Topics on disk and the partition logs of every one of them.

Layout under the broker's data directory::

    data_dir/topics/<topic>/topic.json      name, topic_id, partitions, overrides,
                                            internal, created_ms (written atomically)
    data_dir/topics/<topic>/<partition>/    that partition's segments (see segment.py)
    data_dir/topics/<topic>.<hex>-delete/   a topic being deleted; removed on sight

A topic is created by making its partition logs first and writing
``topic.json`` last (write, fsync, rename): the rename is the commit point,
and any failure before it removes everything made so far. A topic whose
metadata cannot be read, or whose logs cannot be opened, is *offline*: it is
reported (an ERROR line naming the file, the broker's offline-partition
gauge, KAFKA_STORAGE_ERROR in Metadata) and can be deleted, while every other
topic serves; start-up never fails because of one topic.

``topic.json`` holds only the Kafka-named overrides, so a topic's effective
configuration is always ``defaults.with_overrides(overrides)``: changing a
broker default reaches every topic that did not set the key itself.

Slow disk work runs in worker threads the manager owns: ``maintain`` (the
broker's maintenance pass) unlinks expired segments and fsyncs on an I/O
executor, and cleans compacted logs on a single-thread cleaner executor, so at
most one compaction runs at a time; the loop only decides and swaps results in.
``maintenance`` is the same pass run inline, for tools and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from streambus.errors import (
    InvalidPartitionsError,
    InvalidTopicError,
    KafkaStorageError,
    StreamBusError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from streambus.storage.datadir import FDS_PER_PARTITION, partition_fd_budget, write_atomically
from streambus.storage.health import WriteHealth
from streambus.storage.log import CompactionJob, PartitionLog
from streambus.storage.segment import Segment, fsync_dir
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


@dataclass(frozen=True)
class OfflineTopic:
    """A topic found on disk that cannot be served, and why."""

    name: str
    path: Path  # the file or directory at fault, for the operator
    reason: str
    partitions: int  # from its metadata, else the partition directories found
    topic_id: uuid.UUID | None = None
    internal: bool = False


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


def _meta_json(meta: TopicMeta) -> bytes:
    content = {
        "name": meta.name,
        "topic_id": str(meta.topic_id),
        "partitions": meta.partitions,
        "overrides": dict(meta.overrides),
        "internal": meta.internal,
        "created_ms": meta.created_ms,
    }
    return (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()


def _partition_dirs(topic_dir: Path) -> int:
    """Partition count suggested by the directories present (highest index + 1)."""
    try:
        indexes = [int(p.name) for p in topic_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    except OSError:
        return 0
    return max(indexes) + 1 if indexes else 0


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


def _delete_segments(segments: list[Segment]) -> None:
    """Worker thread: remove the files of segments already out of their logs."""
    for segment in segments:
        try:
            segment.delete()
        except OSError as exc:
            log.error("deleting %s failed: %s", segment.log_path, exc)


class _Topic:
    __slots__ = ("config", "logs", "meta")

    def __init__(self, meta: TopicMeta, config: TopicConfig, logs: list[PartitionLog]) -> None:
        self.meta = meta
        self.config = config
        self.logs = logs


class _PartitionOpenError(Exception):
    """A partition log of a topic being opened failed; carries the path to report."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class LogManager:
    """Every topic's metadata and partition logs under one data directory."""

    def __init__(
        self,
        data_dir: Path,
        defaults: TopicConfig,
        *,
        clock: Callable[[], float] = time.time,
        max_partitions: int = 0,
        health: WriteHealth | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.defaults = defaults
        self.max_partitions = max_partitions  # 0: no limit but the descriptor budget
        self.health = health if health is not None else WriteHealth()
        self._clock = clock
        self._root = data_dir / "topics"
        self._topics: dict[str, _Topic] = {}
        self._offline: dict[str, OfflineTopic] = {}
        self._io: ThreadPoolExecutor | None = None  # unlinks and fsyncs
        self._cleaner: ThreadPoolExecutor | None = None  # one compaction at a time

    def load(self) -> None:
        """Open every topic found on disk; one that cannot be opened is marked offline."""
        self._root.mkdir(parents=True, exist_ok=True)
        for topic_dir in sorted(self._root.iterdir()):
            name = topic_dir.name
            if not topic_dir.is_dir() or name in self._topics or name in self._offline:
                continue
            meta_path = topic_dir / _META_FILE
            try:
                meta = _read_meta(meta_path)
                if meta.name != name:
                    raise ValueError(f"names topic {meta.name!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if _DELETING.fullmatch(name):  # a delete interrupted by a crash
                    shutil.rmtree(topic_dir, ignore_errors=True)
                    continue
                self._set_offline(
                    OfflineTopic(
                        name,
                        meta_path,
                        f"no valid {_META_FILE} ({exc})",
                        _partition_dirs(topic_dir),
                    )
                )
                continue
            try:
                config = self.defaults.with_overrides(meta.overrides)
            except Exception as exc:
                self._set_offline(
                    OfflineTopic(
                        name,
                        meta_path,
                        f"invalid overrides ({exc})",
                        meta.partitions,
                        meta.topic_id,
                        meta.internal,
                    )
                )
                continue
            try:
                self._open_topic(meta, config)
            except _PartitionOpenError as exc:
                self._set_offline(
                    OfflineTopic(
                        name, exc.path, exc.reason, meta.partitions, meta.topic_id, meta.internal
                    )
                )

    def _set_offline(self, offline: OfflineTopic) -> None:
        self._offline[offline.name] = offline
        log.error(
            "topic %s is offline (%d partitions): %s: %s",
            offline.name,
            offline.partitions,
            offline.path,
            offline.reason,
        )

    def _open_topic(self, meta: TopicMeta, config: TopicConfig) -> None:
        """Open every partition log, or none: on failure the opened ones are closed again."""
        topic_dir = self._root / meta.name
        logs: list[PartitionLog] = []
        for p in range(meta.partitions):
            path = topic_dir / str(p)
            try:
                plog = PartitionLog.open(path, config, clock=self._clock)
            except Exception as exc:
                for opened in logs:
                    with contextlib.suppress(Exception):
                        opened.close()
                raise _PartitionOpenError(path, f"cannot open partition log: {exc}") from exc
            plog.health = self.health
            plog.set_background(self._submit_io)
            logs.append(plog)
        self._topics[meta.name] = _Topic(meta, config, logs)

    def validate_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        internal: bool = False,
        topic_id: uuid.UUID | None = None,
    ) -> TopicMeta:
        """What ``create_topic`` would create, raising what it would raise; creates nothing
        (CreateTopics with validate_only)."""
        validate_topic_name(name)
        if name in self._topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        offline = self._offline.get(name)
        if offline is not None:
            raise TopicAlreadyExistsError(
                f"topic {name!r} already exists and is offline ({offline.path}: "
                f"{offline.reason}); delete it to create it again"
            )
        collision = name.replace(".", "_")
        for existing in (*self._topics, *self._offline):
            if existing.replace(".", "_") == collision:
                # Metric names map '.' to '_', so Kafka refuses topics differing only there.
                raise InvalidTopicError(f"topic {name!r} collides with existing topic {existing!r}")
        if partitions < 1:
            raise InvalidPartitionsError(
                f"number of partitions must be at least 1, got {partitions}"
            )
        self._check_size(partitions)
        self.defaults.with_overrides(overrides)  # raises InvalidConfigError
        kept = {key: value for key, value in overrides.items() if value is not None}
        return TopicMeta(
            name=name,
            topic_id=topic_id or uuid.uuid4(),  # the cluster's id when it chose one
            partitions=partitions,
            overrides=MappingProxyType(kept),
            internal=internal,
            created_ms=int(self._clock() * 1000),
        )

    def _check_size(self, partitions: int) -> None:
        """Refuse a topic this broker could not keep open, before anything touches disk."""
        open_now = sum(len(topic.logs) for topic in self._topics.values())
        hosted = open_now + sum(t.partitions for t in self._offline.values())
        if self.max_partitions and hosted + partitions > self.max_partitions:
            raise InvalidPartitionsError(
                f"{partitions} partitions would make {hosted + partitions} on this broker, "
                f"over its max.partitions limit of {self.max_partitions}"
            )
        budget = partition_fd_budget()
        if open_now + partitions > budget:
            raise InvalidPartitionsError(
                f"{partitions} partitions would make {open_now + partitions} open on this "
                f"broker; its open-files limit (RLIMIT_NOFILE) leaves room for {budget} at "
                f"{FDS_PER_PARTITION} descriptors each, keeping the rest for connections"
            )

    def create_topic(
        self,
        name: str,
        partitions: int,
        overrides: Mapping[str, str | None],
        *,
        internal: bool = False,
        topic_id: uuid.UUID | None = None,
    ) -> TopicMeta:
        meta = self.validate_topic(
            name, partitions, overrides, internal=internal, topic_id=topic_id
        )
        config = self.defaults.with_overrides(meta.overrides)
        topic_dir = self._root / name
        if topic_dir.exists():  # debris without valid metadata, already reported by load
            raise TopicAlreadyExistsError(f"directory {topic_dir} already exists")
        try:
            topic_dir.mkdir(parents=True)
            self._open_topic(meta, config)
            try:
                write_atomically(topic_dir / _META_FILE, _meta_json(meta))
                fsync_dir(self._root)
            except BaseException:
                for plog in self._topics.pop(name).logs:
                    with contextlib.suppress(Exception):
                        plog.close()
                raise
        except (OSError, _PartitionOpenError) as exc:
            self._discard(topic_dir)
            self.health.failed(f"creating topic {name}", exc)
            raise KafkaStorageError(
                f"creating topic {name!r} with {partitions} partitions failed, "
                f"nothing was kept: {exc}"
            ) from exc
        except BaseException:
            self._discard(topic_dir)
            raise
        self.health.succeeded()
        log.info(
            "created topic %s with %d partitions, overrides %s",
            name,
            partitions,
            dict(meta.overrides),
        )
        return meta

    def add_partitions(self, name: str, partitions: int) -> TopicMeta:
        """Grow ``name`` to ``partitions`` (CreatePartitions): the new partitions' logs are
        opened, then topic.json names the new count. A failure keeps the old count: new
        directories already made are removed, and an existing one is left for ``load``."""
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        old = topic.meta.partitions
        if partitions <= old:
            raise InvalidPartitionsError(
                f"topic {name!r} has {old} partitions, not fewer than the requested {partitions}"
            )
        self._check_size(partitions - old)
        topic_dir = self._root / name
        meta = replace(topic.meta, partitions=partitions)
        added: list[PartitionLog] = []
        try:
            for p in range(old, partitions):
                plog = PartitionLog.open(topic_dir / str(p), topic.config, clock=self._clock)
                plog.health = self.health
                plog.set_background(self._submit_io)
                added.append(plog)
            write_atomically(topic_dir / _META_FILE, _meta_json(meta))
            fsync_dir(topic_dir)
        except Exception as exc:
            for plog in added:
                with contextlib.suppress(Exception):
                    plog.close()
            for p in range(old, partitions):
                shutil.rmtree(topic_dir / str(p), ignore_errors=True)
            if isinstance(exc, OSError):
                self.health.failed(f"adding partitions to {name}", exc)
            raise KafkaStorageError(
                f"adding partitions {old}..{partitions - 1} to topic {name!r} failed, "
                f"it keeps {old}: {exc}"
            ) from exc
        topic.logs.extend(added)
        topic.meta = meta
        self.health.succeeded()
        log.info("topic %s grew from %d to %d partitions", name, old, partitions)
        return meta

    def _discard(self, topic_dir: Path) -> None:
        """Remove what a failed creation made; what cannot be removed is reported offline."""
        shutil.rmtree(topic_dir, ignore_errors=True)
        if topic_dir.exists():
            self._set_offline(
                OfflineTopic(
                    topic_dir.name,
                    topic_dir,
                    "left behind by a failed creation",
                    _partition_dirs(topic_dir),
                )
            )

    def restore_metadata(
        self, name: str, partitions: int, overrides: Mapping[str, str], *, internal: bool
    ) -> bool:
        """Give an offline topic whose metadata is lost the metadata the broker knows it
        must have (its own internal topics), keeping its logs. True if it is online now."""
        offline = self._offline.get(name)
        if offline is None or offline.path.name != _META_FILE or offline.partitions > partitions:
            return False
        meta = TopicMeta(
            name=name,
            topic_id=offline.topic_id or uuid.uuid4(),
            partitions=partitions,
            overrides=MappingProxyType(dict(overrides)),
            internal=internal,
            created_ms=int(self._clock() * 1000),
        )
        try:
            config = self.defaults.with_overrides(meta.overrides)
            self._open_topic(meta, config)
        except (StreamBusError, _PartitionOpenError) as exc:
            log.error("cannot bring topic %s back online: %s", name, exc)
            return False
        try:
            write_atomically(self._root / name / _META_FILE, _meta_json(meta))
        except OSError as exc:
            for plog in self._topics.pop(name).logs:
                with contextlib.suppress(Exception):
                    plog.close()
            self.health.failed(f"restoring {name}/{_META_FILE}", exc)
            return False
        del self._offline[name]
        log.warning(
            "topic %s was offline (%s); metadata rewritten, now online", name, offline.reason
        )
        return True

    def delete_topic(self, name: str) -> TopicMeta:
        offline = self._offline.pop(name, None)
        if offline is not None:
            self._remove_dir(name)
            log.info("deleted offline topic %s", name)
            return TopicMeta(
                name,
                offline.topic_id or uuid.UUID(int=0),
                offline.partitions,
                MappingProxyType({}),
                offline.internal,
            )
        topic = self._topics.pop(name, None)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        for plog in topic.logs:
            plog.close()
        self._remove_dir(name)
        log.info("deleted topic %s", name)
        return topic.meta

    def _remove_dir(self, name: str) -> None:
        topic_dir = self._root / name
        if not topic_dir.exists():  # an offline topic whose directory someone removed
            return
        doomed = self._root / f"{name}.{uuid.uuid4().hex}-delete"
        # After the rename a crash cannot resurrect the topic: load() removes the debris.
        os.replace(topic_dir, doomed)
        fsync_dir(self._root)
        shutil.rmtree(doomed, ignore_errors=True)

    def set_defaults(self, defaults: TopicConfig) -> None:
        """New broker-wide topic defaults (dynamic broker configs): every open topic's
        partitions take its new effective config from their next append or maintenance."""
        self.defaults = defaults
        for topic in self._topics.values():
            self._reconfigure(topic)

    def set_overrides(self, name: str, overrides: Mapping[str, str]) -> TopicMeta:
        """Replace a topic's overrides (AlterConfigs): topic.json first, then its logs."""
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        self.defaults.with_overrides(overrides)  # raises InvalidConfigError
        meta = replace(topic.meta, overrides=MappingProxyType(dict(overrides)))
        try:
            write_atomically(self._root / name / _META_FILE, _meta_json(meta))
        except OSError as exc:
            self.health.failed(f"writing {name}/{_META_FILE}", exc)
            raise KafkaStorageError(f"storing the configs of topic {name!r} failed: {exc}") from exc
        topic.meta = meta
        self._reconfigure(topic)
        log.info("topic %s overrides now %s", name, dict(meta.overrides))
        return meta

    def _reconfigure(self, topic: _Topic) -> None:
        config = self.defaults.with_overrides(topic.meta.overrides)
        if config == topic.config:
            return
        topic.config = config
        for plog in topic.logs:
            plog.update_config(config)

    def offline_topics(self) -> Mapping[str, OfflineTopic]:
        return MappingProxyType(self._offline)

    def offline_partition_count(self) -> int:
        return sum(offline.partitions for offline in self._offline.values())

    def topics(self) -> Mapping[str, TopicMeta]:
        return MappingProxyType({name: topic.meta for name, topic in self._topics.items()})

    def topic_config(self, name: str) -> TopicConfig:
        topic = self._topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        return topic.config

    def log(self, tp: TopicPartition) -> PartitionLog:
        topic = self._topics.get(tp.topic)
        if topic is None and tp.topic in self._offline:
            offline = self._offline[tp.topic]
            raise KafkaStorageError(f"topic {tp.topic!r} is offline: {offline.reason}")
        if topic is None or not 0 <= tp.partition < len(topic.logs):
            raise UnknownTopicOrPartitionError(f"unknown partition {tp.topic}-{tp.partition}")
        return topic.logs[tp.partition]

    def logs(self) -> Iterator[tuple[TopicPartition, PartitionLog]]:
        for name, topic in list(self._topics.items()):
            for partition, plog in enumerate(topic.logs):
                yield TopicPartition(name, partition), plog

    # -- worker threads --------------------------------------------------------------

    def _submit_io(self, job: Callable[[], None]) -> Future[None]:
        if self._io is None:
            self._io = ThreadPoolExecutor(2, thread_name_prefix="streambus-io")
        return self._io.submit(job)

    def _submit_clean(self, job: CompactionJob) -> None:
        if self._cleaner is None:
            self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="streambus-cleaner")
        job.future = self._cleaner.submit(job.run)

    async def drain(self) -> None:
        """Wait for work in worker threads; a running compaction is aborted."""
        pending = [future for _, plog in self.logs() for future in plog.background_work()]
        if pending:
            await asyncio.gather(*map(asyncio.wrap_future, pending), return_exceptions=True)

    # -- flushing and closing ----------------------------------------------------------

    def flush_all(self) -> None:
        for _, plog in self.logs():
            plog.flush()

    async def flush_all_in_background(self) -> None:
        """``flush_all`` with the fsyncs in worker threads, after any in flight."""
        await self.drain()
        pending = [f for _, plog in self.logs() if (f := plog.flush_in_background()) is not None]
        # A failed fsync was logged by its thread.
        await asyncio.gather(*map(asyncio.wrap_future, pending), return_exceptions=True)

    def close(self) -> None:
        """Close every log, then the worker threads (after ``drain`` they are idle)."""
        for tp, plog in self.logs():
            try:
                plog.close()
            except OSError as exc:  # a failing disk must not keep the other logs open
                log.error("closing %s-%d failed: %s", tp.topic, tp.partition, exc)
        self._topics.clear()
        self._offline.clear()
        for executor in (self._cleaner, self._io):
            if executor is not None:
                executor.shutdown(wait=True)
        self._cleaner = self._io = None

    # -- maintenance -------------------------------------------------------------------

    def maintenance(self, now_ms: int) -> MaintenanceReport:
        """Retention, compaction and time-based flushing for every log, inline.

        A failing log is reported and skipped so the others still get their turn.
        """
        deleted = compactions = 0
        for tp, plog in self.logs():
            try:
                deleted += plog.enforce_retention(now_ms)
                compactions += plog.compact(now_ms)
                plog.maybe_flush(now_ms)
            except OSError as exc:  # a full disk: reported once by the health tracker
                self.health.failed(f"maintenance of {tp.topic}-{tp.partition}", exc)
            except Exception:
                log.exception("maintenance of %s-%d failed", tp.topic, tp.partition)
        return MaintenanceReport(deleted, compactions)

    async def maintain(self, now_ms: int) -> MaintenanceReport:
        """``maintenance`` with unlinks, fsyncs and cleaning in worker threads.

        The cheap passes first (retention, flush.ms) for every log, then the
        compactions one after another, so a long cleaning delays no fsync.
        """
        doomed: list[Segment] = []
        flushes: list[tuple[TopicPartition, Future[None]]] = []
        for tp, plog in self.logs():
            try:
                doomed += plog.detach_expired(now_ms)
                flushing = plog.flush_if_due(now_ms)  # raises what the last one met
                if flushing is not None:
                    flushes.append((tp, flushing))
            except OSError as exc:  # a full disk: reported once by the health tracker
                self.health.failed(f"maintenance of {tp.topic}-{tp.partition}", exc)
            except Exception:
                log.exception("maintenance of %s-%d failed", tp.topic, tp.partition)
        if doomed:
            await asyncio.wrap_future(self._submit_io(lambda: _delete_segments(doomed)))
        done = await asyncio.gather(
            *(asyncio.wrap_future(f) for _, f in flushes), return_exceptions=True
        )
        for (tp, _), outcome in zip(flushes, done, strict=True):
            if isinstance(outcome, Exception):  # the log redoes that fsync next time
                self.health.failed(f"fsync of {tp.topic}-{tp.partition}", outcome)
        compactions = 0
        for tp, plog in self.logs():
            try:
                job = plog.start_compaction(now_ms)
                if job is not None:
                    compactions += await self._compact(plog, job)
            except (OSError, KafkaStorageError) as exc:  # a full disk: reported once
                self.health.failed(f"compaction of {tp.topic}-{tp.partition}", exc)
            except Exception:
                log.exception("compaction of %s-%d failed", tp.topic, tp.partition)
        return MaintenanceReport(len(doomed), compactions)

    async def _compact(self, plog: PartitionLog, job: CompactionJob) -> bool:
        self._submit_clean(job)
        assert job.future is not None
        try:
            result = await asyncio.wrap_future(job.future)
        except Exception:
            plog.finish_compaction(job, None)
            raise
        changed = plog.finish_compaction(job, result)
        if job.adopted or job.discarded:
            await asyncio.wrap_future(self._submit_io(job.settle))
        return changed

    def total_size_bytes(self) -> int:
        return sum(plog.size_bytes for _, plog in self.logs())

    def total_segments(self) -> int:
        return sum(plog.segment_count for _, plog in self.logs())
