"""Real servers for tests: an in-process broker on its own event-loop thread, a subprocess broker,
scrapes of /metrics. Everything listens on 127.0.0.1 on ports picked free, and is stopped by the
test that started it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from streambus import Broker, BrokerConfig
from telemetry import ANY_FREE_PORT, Pipeline, TelemetryConfig, start_pipeline

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_EPHEMERAL = _ephemeral_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port the kernel hands out for
    bind(0) is one it also hands to outgoing connections: while a test has a broker down,
    a client's or a Raft peer's reconnect could take it as its own local port (or connect to
    itself through it), and the restarted broker could not bind it."""
    low = max(1024, _EPHEMERAL[0] - 20000)
    for _ in range(200):
        port = secrets.randbelow(_EPHEMERAL[0] - low) + low
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # a crowded range: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerThread:
    """A broker with a real telemetry pipeline, served from a thread of its own."""

    def __init__(
        self,
        data_dir: Path,
        *,
        tracer_provider: TracerProvider | None = None,
        metrics: bool = True,
        **config: Any,
    ) -> None:
        self.data_dir = data_dir
        config.setdefault("host", "127.0.0.1")
        config.setdefault("port", 0)
        config.setdefault("maintenance_interval_ms", 200)
        config.setdefault("schema_registry_port", 0)  # tests that want it pick a free port
        self.config = BrokerConfig.load(
            {"data_dir": data_dir, **{k: v for k, v in config.items() if k != "topic"}},
            config.get("topic", {}),
            env={},
        )
        self.pipeline: Pipeline = start_pipeline(
            TelemetryConfig(
                metrics_host="127.0.0.1",
                metrics_port=ANY_FREE_PORT if metrics else 0,
                broker_id=str(self.config.broker_id),
                tracing=False,
            ),
            set_global=False,
        )
        self._tracer_provider = tracer_provider
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.broker: Broker

    def __enter__(self) -> BrokerThread:
        self._thread.start()
        self.broker = Broker(
            self.config,
            meter_provider=self.pipeline.meter_provider,
            tracer_provider=self._tracer_provider,
        )
        self.call(self.broker.start())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.call(self.broker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.pipeline.shutdown()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the broker's loop thread (the broker is single-threaded)."""

        async def go() -> Any:
            return fn(*args)

        return self.call(go())

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    @property
    def metrics_url(self) -> str:
        assert self.pipeline.metrics_address is not None
        host, port = self.pipeline.metrics_address
        return f"http://{host}:{port}/metrics"

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a real HTTP scrape, keyed by (name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(scrape_text(url)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of ``name`` over the series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= set(lbls))


class BrokerProcess:
    """``streambus serve`` as a child process: what a user runs, and what SIGKILL can hit."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        preexec_fn: Any = None,  # e.g. lowering RLIMIT_NOFILE in the child
    ) -> None:
        self.data_dir = data_dir
        self.preexec_fn = preexec_fn
        self.port = free_port()
        self.metrics_port = free_port()
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"broker-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> BrokerProcess:
        """Start the process; with ``wait``, return once its Kafka port listens."""
        cmd = [
            sys.executable,
            "-m",
            "streambus",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--schema-registry-port",  # off unless a test asks (extra flags come later)
            "0",
            *self.extra,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            preexec_fn=self.preexec_fn,  # noqa: PLW1509 - only what a test passes
        )
        if wait:
            wait_for_port(self.port, self.proc)
        return self

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._log.close()
        return code

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._log.close()


class ClusterProcesses:
    """``size`` brokers as ``streambus serve`` processes on loopback, each a voter of one Raft
    quorum, with free Kafka, metrics and Raft ports, a data dir each under ``root`` and one
    secret (in the environment, as an operator would pass it)."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        secret: str | None = None,  # None: a random one
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.secret = secret or secrets.token_hex(16)
        self.env = env or {}
        self.size = size
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.raft_ports = {node: free_port() for node in range(1, self.size + 1)}
        self.brokers = {node: self.process(node) for node in self.raft_ports}

    def quorum(self, **replace: int) -> str:
        """The --controller-quorum value; ``n2=port`` names another Raft port for node 2."""
        ports = {**self.raft_ports, **{int(k[1:]): v for k, v in replace.items()}}
        return ",".join(f"{node}@127.0.0.1:{port}" for node, port in sorted(ports.items()))

    def process(
        self,
        node: int,
        *,
        quorum: str | None = None,
        secret: str | None = None,
        name: str | None = None,
    ) -> BrokerProcess:
        """A broker of this cluster, not started; ``quorum``/``secret`` override this cluster's."""
        return BrokerProcess(
            self.root / (name or f"node-{node}"),
            "--node-id",
            str(node),
            "--controller-quorum",
            quorum or self.quorum(),
            "--advertised-host",
            "127.0.0.1",
            env={**self.env, "STREAMBUS_CLUSTER_SECRET": secret or self.secret},
        )

    def start(self) -> ClusterProcesses:
        # All at once: no broker finishes starting before a majority of voters runs.
        for broker in self.brokers.values():
            broker.start(wait=False)
        for broker in self.brokers.values():
            wait_for_port(broker.port, broker.proc, timeout=60)
        return self

    def stop(self) -> None:
        for broker in self.brokers.values():
            broker.__exit__()

    def __enter__(self) -> ClusterProcesses:
        # A port picked free can be taken before the broker binds it (free_port closes its
        # socket); a broker then exits saying it cannot bind, and new ports are picked.
        for attempt in range(3):
            try:
                return self.start()
            except (RuntimeError, TimeoutError):
                self.stop()
                logs = [b.log_text() for b in self.brokers.values() if b.log_path.exists()]
                taken = ("cannot bind", "Address already in use")
                if attempt == 2 or not any(t in log for log in logs for t in taken):
                    raise
                self._pick_ports()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc and exc[0] is not None:
            self.print_log_tails()

    def print_log_tails(self, lines: int = 40) -> None:
        """Each broker's last log lines on stderr, which pytest shows beside a failure."""
        for node, broker in self.brokers.items():
            if broker.log_path.exists():
                tail = broker.log_text().splitlines()[-lines:]
                head = f"--- node {node} ({broker.log_path.name}), last {len(tail)} lines ---"
                print(head, *tail, sep="\n", file=sys.stderr)

    @property
    def bootstrap(self) -> str:
        return ",".join(b.bootstrap for b in self.brokers.values())

    def live(self) -> dict[int, BrokerProcess]:
        return {n: b for n, b in self.brokers.items() if b.proc and b.proc.poll() is None}


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_until(predicate: Any, timeout: float = 15, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = getattr(predicate, "__qualname__", repr(predicate))
            raise TimeoutError(f"{what} not met in {timeout:g}s (last value {value!r})")
        time.sleep(interval)


@contextlib.contextmanager
def running(data_dir: Path, **config: Any) -> Iterator[BrokerThread]:
    with BrokerThread(data_dir, **config) as b:
        yield b


class RawClient:
    """A bare Kafka protocol connection: send exactly the bytes a test wants, read the reply."""

    def __init__(self, bootstrap: str, timeout: float = 10) -> None:
        host, port = bootstrap.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout)
        self._correlation = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, request: Any, version: int) -> Any:
        self._correlation += 1
        request.with_header(correlation_id=self._correlation, client_id="raw-test")
        self.sock.sendall(bytes(request.encode(version=version, header=True, framed=True)))
        if not request.expect_response():
            return None
        return self.read_response(type(request), version)

    def read_frame(self) -> bytes:
        head = self._read_exactly(4)
        return self._read_exactly(int.from_bytes(head, "big", signed=True))

    def read_response(self, request_cls: Any, version: int) -> Any:
        frame = self.read_frame()
        return _response_class(request_cls).decode(frame, version=version, header=True)

    def _read_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by the broker")
            buf += chunk
        return buf

    def is_closed_by_peer(self, wait: float = 5) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def _response_class(request_cls: Any) -> Any:
    import importlib

    module = importlib.import_module(request_cls.__module__)
    return getattr(module, request_cls.__name__.split("_v")[0].replace("Request", "Response"))


def fetch_request(
    topic: str,
    partition: int = 0,
    *,
    max_wait_ms: int = 0,
    min_bytes: int = 0,
    max_bytes: int = 50_000_000,
) -> Any:
    """A Fetch (v12 fields) of one partition from offset 0."""
    from kafka.protocol.consumer import FetchRequest as F

    return F(
        replica_id=-1,
        max_wait_ms=max_wait_ms,
        min_bytes=min_bytes,
        max_bytes=max_bytes,
        isolation_level=0,
        session_id=0,
        session_epoch=-1,
        forgotten_topics_data=[],
        rack_id="",
        topics=[
            F.FetchTopic(
                topic=topic,
                partitions=[
                    F.FetchTopic.FetchPartition(
                        partition=partition,
                        current_leader_epoch=-1,
                        fetch_offset=0,
                        log_start_offset=-1,
                        partition_max_bytes=max_bytes,
                    )
                ],
            )
        ],
    )
