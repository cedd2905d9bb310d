"""The README's commands, run or checked as a newcomer would copy them.

The "Running a broker" sequence runs as written on one machine, with its ports and data
directory moved to free ones; every ``streambus serve`` command in a shell block parses with
the CLI's own parser; every ``make`` target the README names exists.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streambus.cli import build_parser
from tests.harness import ROOT, free_port, wait_for_port

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def shell_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh")]


def section(title: str) -> str:
    """The README from the heading ``title`` to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def moved(command: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in command, f"README command no longer has {old!r}: {command}"
        command = command.replace(old, new)
    return command


def test_running_a_broker_runs_as_written(tmp_path: Path) -> None:
    for tool in ("kcat", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"no `{tool}` on PATH (make test installs kcat; curl is the README's)")
    serve_block, client_block = shell_blocks(section("Running a broker"))
    port, metrics_port = free_port(), free_port()
    (serve,) = commands(serve_block)
    # The README's `.venv/bin/streambus` is this checkout's entry point, run from its root.
    serve = moved(
        serve,
        {
            ".venv/bin/streambus": f"{shlex.quote(sys.executable)} -m streambus",
            "--data-dir ./data": f"--data-dir {shlex.quote(str(tmp_path / 'data'))}",
            "--port 9092": f"--port {port}",
            "--metrics-port 9090": f"--metrics-port {metrics_port}",
        },
    )
    log = tmp_path / "broker.log"
    with log.open("wb") as out:
        broker = subprocess.Popen(shlex.split(serve), cwd=ROOT, stdout=out, stderr=out)
    try:
        wait_for_port(port, broker)
        wait_for_port(metrics_port, broker)
        outputs = []
        for as_written in commands(client_block):
            command = as_written.replace("localhost:9092", f"localhost:{port}")
            command = command.replace("localhost:9090", f"localhost:{metrics_port}")
            done = subprocess.run(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr, log.read_text())
            outputs.append((command, done.stdout))
        produced, consumed, scraped = outputs
        assert "-P" in produced[0]
        assert consumed[1].splitlines() == ["hello"], consumed
        produced_total = r"^streambus_messages_produced_total\{[^}]*topic=\"demo\"[^}]*\} (\S+)$"
        counts = re.findall(produced_total, scraped[1], re.M)
        assert [float(c) for c in counts] == [1.0], scraped[1]
    finally:
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
        code = broker.wait(30)
    # "SIGINT or SIGTERM stops it gracefully ... with exit code 0."
    assert code == 0, log.read_text()


def test_version_prints_the_installed_version() -> None:
    assert "`streambus --version` prints the installed version" in README
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run(
        [sys.executable, "-m", "streambus", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version in done.stdout


def test_every_serve_command_parses() -> None:
    """Flags in the README's ``streambus serve`` commands are flags the CLI takes."""
    parser = build_parser()
    found = 0
    for block in shell_blocks(README):
        for command in commands(block):
            words = shlex.split(command.replace("$(", "(").replace("&", ""))
            if "serve" not in words or not any(w.endswith("streambus") for w in words):
                continue
            found += 1
            argv = words[words.index("serve") :]
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"README command does not parse ({exc}): {command}")
    assert found >= 4


def test_every_make_target_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"(?:^|`|\s)make ([\w-]+)", "\n".join(shell_blocks(README))))
    named |= set(re.findall(r"`make ([\w-]+)", README))
    assert {"demo", "test", "otelcol", "kafka-tools"} <= named
    assert named <= targets, named - targets


def test_the_protocol_table_lists_every_api_served() -> None:
    """Each API the broker serves is a row of *Kafka protocol support* with the versions
    it serves, and the table names nothing it does not serve."""
    from streambus.app import APIS

    documented: dict[str, tuple[int, int]] = {}
    for row in re.findall(r"^\| (.+?) \| (.+?) \|$", section("Kafka protocol support"), re.M):
        names, versions = row
        if names in ("API", "---"):
            continue
        ranges = versions.split(" (")[0].split(", ")
        assert len(ranges) == len(names.split(", ")), row
        for name, span in zip(names.split(", "), ranges, strict=True):
            low, _, high = span.partition("\N{EN DASH}")
            documented[name] = (int(low), int(high or low))
    served = {spec.name: (spec.min_version, spec.max_version) for spec in APIS.values()}
    assert documented == served
