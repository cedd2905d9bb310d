"""The reference broker: Apache Kafka from its jars on Maven Central, one KRaft node.

``ensure_kafka()`` fetches the jars named by ``bench/kafka/pom.xml`` (``kafka_2.13`` and its
runtime dependencies, plus an slf4j binding) with Maven into ``.tools/kafka-<version>/libs``,
once: when that directory is complete it is used as it is (a lock file makes concurrent callers
wait for one fetch). ``ensure_kafka_tools()`` does the same for Kafka's command-line tools
(``bench/kafka-tools/pom.xml``, into ``.tools/kafka-tools-<version>/libs``).

``KafkaServer`` writes a ``server.properties`` for a combined broker+controller node on free
127.0.0.1 ports, formats its storage with a random cluster id (``kafka.tools.StorageTool``),
runs ``kafka.Kafka`` with ``java -cp 'libs/*'`` and the heap and GC flags of Kafka's own start
scripts, waits until the broker answers metadata, and stops it with SIGTERM.

Run by hand: ``python -m bench.kafka fetch`` (print where the jars are), ``fetch-tools``, or
``python -m bench.kafka serve [--port N]`` (a broker until Ctrl+C).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from bench.common import (
    ROOT,
    ServerProcess,
    free_port,
    terminate,
    wait_for_port,
)

POM = ROOT / "bench" / "kafka" / "pom.xml"
TOOLS_POM = ROOT / "bench" / "kafka-tools" / "pom.xml"
TOOLS = ROOT / ".tools"
FETCHED_MARKER = ".fetched"
START_TIMEOUT_S = 90.0
# Kafka's bin/kafka-server-start.sh and kafka-run-class.sh defaults.
HEAP_OPTS = ("-Xmx1G", "-Xms1G")
JVM_PERFORMANCE_OPTS = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-Djava.awt.headless=true",
)
# slf4j-simple (the binding the pom adds) at WARN, with timestamps, to stderr (the log file).
LOGGING_OPTS = (
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
    "-Dorg.slf4j.simpleLogger.showDateTime=true",
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
    "-Dlog4j2.level=warn",
)
# Lines Kafka logs at WARN on every start of a single node; nothing to report.
KAFKA_ROUTINE_WARNINGS = re.compile(
    r"The metadata log appears to be empty|Attempting to close NetworkClient that has already"
)


def kafka_version(pom: Path = POM) -> str:
    """The version a pom pins (its ``kafka.version`` property)."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if match is None:
        raise RuntimeError(f"{pom} has no <kafka.version> property")
    return match.group(1).strip()


@dataclass(frozen=True)
class KafkaHome:
    version: str
    libs: Path
    # Seconds the Maven fetch took in this process; None when the jars were already there.
    fetch_seconds: float | None


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("no `java` on PATH: Kafka 4 needs Java 17 or newer")
    return java


def java_version() -> str:
    """``java -version``'s first line, e.g. 'openjdk version "17.0.15" 2025-04-15'."""
    out = subprocess.run(
        [java_binary(), "-version"], capture_output=True, text=True, timeout=30, check=True
    )
    return (out.stderr or out.stdout).splitlines()[0].strip()


def _java_major(version_line: str) -> int:
    match = re.search(r'"(\d+)(?:\.(\d+))?', version_line)
    if match is None:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def ensure_kafka(log: bool = True) -> KafkaHome:
    """The Kafka jars, fetched with Maven into ``.tools/kafka-<version>/libs`` if missing."""
    return fetch_jars(POM, "kafka", "kafka_2.13-*.jar", log=log)


def ensure_kafka_tools(log: bool = True) -> KafkaHome:
    """Kafka's command-line tools (``kafka-tools`` and its dependencies), fetched with Maven into
    ``.tools/kafka-tools-<version>/libs`` if missing."""
    return fetch_jars(TOOLS_POM, "kafka-tools", "kafka-tools-[0-9]*.jar", log=log)


def fetch_jars(pom: Path, name: str, probe: str, *, log: bool = True) -> KafkaHome:
    """The runtime dependencies of ``pom`` in ``.tools/<name>-<version>/libs``, fetched with
    Maven once. A lock file beside the directory makes concurrent callers (parallel test runs,
    a bench beside the tests) wait for one fetch instead of writing the same files."""
    version = kafka_version(pom)
    home = TOOLS / f"{name}-{version}"
    libs = home / "libs"

    def fetched() -> bool:
        return (home / FETCHED_MARKER).exists() and any(libs.glob(probe))

    if fetched():
        return KafkaHome(version, libs, None)
    if shutil.which("mvn") is None:
        raise RuntimeError(
            f"no `mvn` on PATH: it fetches {name} {version}'s jars from Maven Central"
        )
    if _java_major(java_version()) < 17:
        raise RuntimeError(f"Kafka {version} needs Java 17 or newer; found {java_version()}")
    TOOLS.mkdir(parents=True, exist_ok=True)
    with open(TOOLS / f"{name}-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fetched():  # another process fetched them while this one waited
            return KafkaHome(version, libs, None)
        partial = home / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        home.mkdir(parents=True, exist_ok=True)
        if log:
            print(f"fetching {name} {version} jars with Maven into {libs} ...", flush=True)
        started = time.monotonic()
        cmd = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"Maven could not fetch {name} {version} (exit {result.returncode}):\n"
                + result.stdout[-4000:]
                + result.stderr[-4000:]
            )
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        (home / FETCHED_MARKER).write_text(f"{name} {version}\n")
    seconds = time.monotonic() - started
    if log:
        jars = len(list(libs.glob("*.jar")))
        print(f"fetched {jars} jars in {seconds:.1f} s", flush=True)
    return KafkaHome(version, libs, seconds)


def random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 chars)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class KafkaServer(ServerProcess):
    """One Kafka node, broker and KRaft controller in one JVM, on free 127.0.0.1 ports."""

    system = "kafka"
    routine_warnings = KAFKA_ROUTINE_WARNINGS

    def __init__(self, work_dir: Path, home: KafkaHome, num_partitions: int = 3) -> None:
        super().__init__(work_dir, "kafka.log")
        self.home = home
        self.controller_port = free_port()
        self.data_dir = work_dir / "data"
        self.config_path = work_dir / "server.properties"
        self.num_partitions = num_partitions

    def properties(self) -> dict[str, str]:
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.num_partitions),
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Delete a deleted topic's files at once (default: 60 s later), as StreamBus does:
            # the harness deletes each topic after its runs to keep the page cache small.
            "log.segment.delete.delay.ms": "0",
        }

    def _java(self, main_class: str, *args: str) -> list[str]:
        return [
            java_binary(),
            *HEAP_OPTS,
            *JVM_PERFORMANCE_OPTS,
            *LOGGING_OPTS,
            "-cp",
            str(self.home.libs / "*"),
            main_class,
            *args,
        ]

    def format_storage(self, cluster_id: str) -> None:
        """Write the node's config and ``StorageTool format`` its data dir with ``cluster_id``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        fmt = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                cluster_id,
                "--config",
                str(self.config_path),
                "--ignore-formatted",
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if fmt.returncode != 0:
            raise RuntimeError(
                f"kafka StorageTool format of {self.data_dir} failed ({fmt.returncode}):\n"
                f"{fmt.stdout}{fmt.stderr}"
            )

    def start(self) -> None:
        started = time.monotonic()
        self.format_storage(random_cluster_id())
        proc = self.launch(self._java("kafka.Kafka", str(self.config_path)), self.work_dir)
        deadline = started + START_TIMEOUT_S
        wait_for_port(self.port, proc, START_TIMEOUT_S, "kafka", self.log_path)
        self._wait_ready(deadline)
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        """Until the broker is registered and unfenced: it lists itself in metadata."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kafka exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2).brokers:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kafka not ready after {START_TIMEOUT_S:.0f}s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM and wait for the controlled shutdown; 0 when it went cleanly."""
        assert self.proc is not None
        code = terminate(self.proc, 60)
        # The JVM answers SIGTERM through its shutdown hooks and exits 143 (128 + 15).
        return 0 if code in (0, 128 + signal.SIGTERM, -signal.SIGTERM) else code


@contextlib.contextmanager
def running_kafka(
    home: KafkaHome, parent: Path | None = None, keep_log: Path | None = None
) -> Iterator[KafkaServer]:
    """A started Kafka node in a temporary directory under ``parent``; always stopped."""
    with tempfile.TemporaryDirectory(prefix="bench-kafka-", dir=parent) as tmp:
        server = KafkaServer(Path(tmp), home)
        try:
            server.start()
            yield server
        finally:
            server.kill()  # a no-op unless stop() was never reached
            server.keep_log(keep_log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the jars if missing; print where they are")
    sub.add_parser("fetch-tools", help="fetch the command-line tools' jars if missing")
    serve = sub.add_parser("serve", help="run a single-node Kafka until Ctrl+C")
    serve.add_argument("--seconds", type=float, default=0, help="stop after this long")
    args = parser.parse_args(argv)
    if args.command == "fetch-tools":
        tools = ensure_kafka_tools()
        print(f"Apache Kafka {tools.version} tools: {tools.libs}")
        return 0
    home = ensure_kafka()
    if args.command == "fetch":
        print(f"Apache Kafka {home.version}: {home.libs}")
        return 0
    with running_kafka(home) as server:
        print(
            f"Kafka {home.version} on {server.bootstrap} (pid {server.pid}), "
            f"started in {server.start_seconds:.1f} s; log {server.log_path}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            if args.seconds:
                time.sleep(args.seconds)
            else:
                signal.pause()
        print(f"RSS {server.rss_bytes() / 2**20:.0f} MiB; stopping ...", flush=True)
        code = server.stop()
        for line in server.problem_lines():
            print(f"  {line}")
    return code


if __name__ == "__main__":
    sys.exit(main())
