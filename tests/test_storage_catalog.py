"""LogManager: topics on disk, their metadata, and maintenance across every log."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streambus.errors import (
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from streambus.records import build_batch
from streambus.storage import LogManager, MaintenanceReport
from streambus.structs import TopicPartition
from streambus.topic_config import CleanupPolicy, TopicConfig

DEFAULTS = TopicConfig(segment_bytes=4096)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[LogManager]:
    mgr = LogManager(tmp_path, DEFAULTS)
    mgr.load()
    yield mgr
    mgr.close()


def reload(tmp_path: Path, old: LogManager) -> LogManager:
    old.close()
    mgr = LogManager(tmp_path, DEFAULTS)
    mgr.load()
    return mgr


def test_create_list_reload_delete(tmp_path: Path, manager: LogManager) -> None:
    meta = manager.create_topic("orders", 3, {})
    assert meta.name == "orders"
    assert meta.partitions == 3
    assert isinstance(meta.topic_id, uuid.UUID)
    assert not meta.internal
    assert set(manager.topics()) == {"orders"}
    assert sorted(tp for tp, _ in manager.logs()) == [TopicPartition("orders", p) for p in range(3)]
    manager.log(TopicPartition("orders", 2)).append(build_batch([(b"k", b"v", [], 1)]))
    manager.create_topic("__consumer_offsets", 1, {}, internal=True)
    assert (tmp_path / "topics" / "orders" / "topic.json").is_file()
    assert (tmp_path / "topics" / "orders" / "2").is_dir()

    manager = reload(tmp_path, manager)
    try:
        assert manager.topics()["orders"] == meta  # same id survives the restart
        assert manager.topics()["__consumer_offsets"].internal
        assert manager.log(TopicPartition("orders", 2)).log_end_offset == 1
        assert manager.total_segments() == 4
        assert manager.total_size_bytes() > 0

        manager.delete_topic("orders")
        assert set(manager.topics()) == {"__consumer_offsets"}
        assert not (tmp_path / "topics" / "orders").exists()
        assert [p.name for p in (tmp_path / "topics").iterdir()] == ["__consumer_offsets"]
        with pytest.raises(UnknownTopicOrPartitionError):
            manager.log(TopicPartition("orders", 0))
        with pytest.raises(UnknownTopicOrPartitionError):
            manager.delete_topic("orders")
        # the name is free again, with a new id
        again = manager.create_topic("orders", 1, {})
        assert again.topic_id != meta.topic_id
        assert manager.log(TopicPartition("orders", 0)).log_end_offset == 0
    finally:
        manager.close()


def test_unknown_partition(manager: LogManager) -> None:
    manager.create_topic("t", 2, {})
    with pytest.raises(UnknownTopicOrPartitionError):
        manager.log(TopicPartition("t", 2))
    with pytest.raises(UnknownTopicOrPartitionError):
        manager.log(TopicPartition("t", -1))
    with pytest.raises(UnknownTopicOrPartitionError):
        manager.topic_config("nope")


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a" * 250, "bad name", "slash/name", "ünicode", "tab\t"]
)
def test_invalid_topic_names(manager: LogManager, name: str) -> None:
    with pytest.raises(InvalidTopicError):
        manager.create_topic(name, 1, {})
    assert not manager.topics()


def test_valid_topic_names(manager: LogManager) -> None:
    for name in ("a" * 249, "with.dots_and-dashes", "UPPER123"):
        manager.create_topic(name, 1, {})
    assert len(manager.topics()) == 3


def test_duplicate_and_colliding_topics(manager: LogManager) -> None:
    manager.create_topic("a.b", 1, {})
    with pytest.raises(TopicAlreadyExistsError):
        manager.create_topic("a.b", 1, {})
    with pytest.raises(InvalidTopicError, match="collides"):
        manager.create_topic("a_b", 1, {})


def test_invalid_partitions(manager: LogManager) -> None:
    with pytest.raises(InvalidPartitionsError):
        manager.create_topic("t", 0, {})


@pytest.mark.parametrize(
    "overrides",
    [{"no.such.setting": "1"}, {"retention.ms": "soon"}, {"cleanup.policy": "shred"}],
)
def test_invalid_config(manager: LogManager, overrides: dict[str, str | None]) -> None:
    with pytest.raises(InvalidConfigError):
        manager.create_topic("t", 1, overrides)
    assert not manager.topics()
    assert not (manager.data_dir / "topics" / "t").exists()


def test_validate_topic_creates_nothing(manager: LogManager) -> None:
    meta = manager.validate_topic("t", 2, {"retention.ms": "5"})
    assert (meta.name, meta.partitions, dict(meta.overrides)) == ("t", 2, {"retention.ms": "5"})
    assert not manager.topics()
    with pytest.raises(InvalidConfigError):
        manager.validate_topic("t", 2, {"retention.ms": "x"})


def test_overrides_persisted_and_reloaded(tmp_path: Path, manager: LogManager) -> None:
    manager.create_topic(
        "compacted",
        1,
        {"cleanup.policy": "compact", "retention.ms": "60000", "segment.ms": None},
    )
    config = manager.topic_config("compacted")
    assert config.cleanup_policy is CleanupPolicy.COMPACT
    assert config.retention_ms == 60_000
    assert config.segment_bytes == DEFAULTS.segment_bytes  # inherited default
    stored = json.loads((tmp_path / "topics" / "compacted" / "topic.json").read_text())
    assert stored["overrides"] == {"cleanup.policy": "compact", "retention.ms": "60000"}

    manager = reload(tmp_path, manager)
    try:
        assert dict(manager.topics()["compacted"].overrides) == stored["overrides"]
        assert manager.topic_config("compacted") == config
        assert manager.log(TopicPartition("compacted", 0)).config == config
    finally:
        manager.close()


def test_broken_topic_dirs_skipped(
    tmp_path: Path, manager: LogManager, caplog: pytest.LogCaptureFixture
) -> None:
    manager.create_topic("good", 1, {})
    (tmp_path / "topics" / "no-meta").mkdir()
    (tmp_path / "topics" / "bad-json").mkdir()
    (tmp_path / "topics" / "bad-json" / "topic.json").write_text("{not json")
    leftover = tmp_path / "topics" / f"gone.{uuid.uuid4().hex}-delete"
    (leftover / "0").mkdir(parents=True)
    caplog.set_level(logging.ERROR, logger="streambus.storage")
    manager = reload(tmp_path, manager)
    try:
        assert set(manager.topics()) == {"good"}
        errors = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert "no-meta" in errors
        assert "bad-json" in errors
        assert not leftover.exists()  # an interrupted delete is finished
        with pytest.raises(TopicAlreadyExistsError):
            manager.create_topic("no-meta", 1, {})
    finally:
        manager.close()


def test_maintenance_runs_retention_and_compaction(manager: LogManager) -> None:
    manager.create_topic("events", 1, {"retention.ms": "1000", "segment.bytes": "1024"})
    manager.create_topic("state", 1, {"cleanup.policy": "compact", "segment.bytes": "1024"})
    events = manager.log(TopicPartition("events", 0))
    state = manager.log(TopicPartition("state", 0))
    for i in range(30):
        events.append(build_batch([(None, b"x" * 100, [], 1_000)]))
        state.append(build_batch([(b"key", b"%03d" % i + b"y" * 100, [], 1_000)]))
    report = manager.maintenance(10_000_000)
    assert isinstance(report, MaintenanceReport)
    assert report.segments_deleted > 0
    assert report.compactions == 1
    assert events.log_start_offset > 0
    assert state.log_start_offset == 0
    assert manager.maintenance(10_000_000) == MaintenanceReport(0, 0)
