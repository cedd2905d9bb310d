"""Configuration: defaults, then STREAMBUS_* variables, then flags; topic defaults by Kafka name."""

from __future__ import annotations

from pathlib import Path

import pytest

from streambus.cli import build_parser, config_from_args
from streambus.config import BrokerConfig
from streambus.errors import InvalidConfigError
from streambus.topic_config import CleanupPolicy


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBUS_PORT", "9999")
    monkeypatch.setenv("STREAMBUS_BROKER_ID", "7")
    monkeypatch.setenv("STREAMBUS_AUTO_CREATE_TOPICS_ENABLE", "false")
    monkeypatch.setenv("STREAMBUS_TOPIC_RETENTION_MS", "1000")
    monkeypatch.setenv("STREAMBUS_TOPIC_CLEANUP_POLICY", "compact")
    args = build_parser().parse_args(
        ["serve", "--port", "9093", "--data-dir", "/tmp/x", "--topic-config", "segment.bytes=4096"]
    )
    config = config_from_args(args)
    assert config.port == 9093  # the flag wins over STREAMBUS_PORT
    assert config.broker_id == 7
    assert config.auto_create_topics_enable is False
    assert config.data_dir == Path("/tmp/x")
    assert config.topic_defaults.retention_ms == 1000
    assert config.topic_defaults.segment_bytes == 4096
    assert config.topic_defaults.cleanup_policy is CleanupPolicy.COMPACT
    assert config.metrics_port == 9090
    assert config.advertised == "localhost"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"STREAMBUS_PORT": "ninety"}, "STREAMBUS_PORT"),
        ({"STREAMBUS_PORT": "70000"}, "port must be"),
        ({"STREAMBUS_TRACING": "maybe"}, "STREAMBUS_TRACING"),
        ({"STREAMBUS_TOPIC_RETENTION_MS": "soon"}, "retention.ms"),
        ({"STREAMBUS_TOPIC_CLEANUP_POLICY": "shred"}, "cleanup.policy"),
        ({"STREAMBUS_NUM_PARTITIONS": "0"}, "num.partitions"),
    ],
)
def test_bad_values_say_what_is_wrong(env: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidConfigError, match=words.replace(".", r"\.")):
        BrokerConfig.load(env=env)


def test_unknown_topic_config_flag_is_refused() -> None:
    args = build_parser().parse_args(["serve", "--topic-config", "retention.minutes=5"])
    with pytest.raises(InvalidConfigError, match=r"retention\.minutes"):
        config_from_args(args)
