"""Configuration: defaults, then STREAMBUS_* variables, then flags; topic defaults by Kafka name."""

from __future__ import annotations

from pathlib import Path

import pytest

from streambus.cli import build_parser, config_from_args, main
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


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    name, version = capsys.readouterr().out.split()
    assert name == "streambus"
    assert version[0].isdigit()


def test_an_unknown_log_level_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--log-level", "LOUD"])
    assert exited.value.code == 2
    assert "expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'" in capsys.readouterr().err
    # The variable is read like every other STREAMBUS_ setting, and checked the same way.
    monkeypatch.setenv("STREAMBUS_LOG_LEVEL", "loud")
    assert main(["serve"]) == 2
    assert "STREAMBUS_LOG_LEVEL" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"
