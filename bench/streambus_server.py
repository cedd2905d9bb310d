"""StreamBus under test: ``streambus serve`` as a child process in one telemetry mode.

Modes:

* ``off``: ``--metrics-port 0 --no-tracing`` (no /metrics endpoint, no tracer provider; the
  SDK ``MeterProvider`` is still built and the broker still records into it).
* ``metrics``: /metrics endpoint on, ``--no-tracing``.
* ``tracing``: /metrics on, tracing on with ``OTEL_TRACES_SAMPLER=always_on`` (100 %
  sampling), spans exported over OTLP/HTTP to an :class:`~bench.otlp.OtlpSink` in the bench
  process, with the batch span processor's delay cut to 500 ms so its export work falls
  inside a timed window of a few seconds.
* ``sdk-disabled``: as ``off`` plus ``OTEL_SDK_DISABLED=true`` (metric calls are no-ops too).

No ``OTEL_*`` variable from the caller's environment reaches the broker.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    ROOT,
    ServerProcess,
    free_port,
    terminate,
    wait_for_port,
)
from bench.otlp import OtlpSink

MODES = ("off", "metrics", "tracing", "sdk-disabled")
BSP_SCHEDULE_DELAY_MS = 500
START_TIMEOUT_S = 30.0


class StreamBusServer(ServerProcess):
    """``streambus serve`` on free 127.0.0.1 ports with a data directory in ``work_dir``."""

    system = "streambus"

    def __init__(self, work_dir: Path, mode: str = "metrics", sink: OtlpSink | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown telemetry mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "tracing" and sink is None:
            raise ValueError("tracing mode needs an OtlpSink to export to")
        super().__init__(work_dir, "broker.log")
        self.mode = mode
        self.metrics_port = 0 if mode in ("off", "sdk-disabled") else free_port()
        self.data_dir = work_dir / "data"
        args = [
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
            "--num-partitions",
            "3",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STREAMBUS_"))}
        # As the Kafka reference is configured: new groups do not wait for more members.
        env["STREAMBUS_GROUP_INITIAL_REBALANCE_DELAY_MS"] = "0"
        if mode == "tracing":
            assert sink is not None
            env.update(
                OTEL_TRACES_SAMPLER="always_on",
                OTEL_TRACES_EXPORTER="otlp",
                OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=sink.endpoint,
                OTEL_METRICS_EXPORTER="none",
                OTEL_BSP_SCHEDULE_DELAY=str(BSP_SCHEDULE_DELAY_MS),
            )
        else:
            args.append("--no-tracing")
        if mode == "sdk-disabled":
            env["OTEL_SDK_DISABLED"] = "true"
        self.cmd = [sys.executable, "-m", "streambus", "serve", *args]
        self.env = env

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def start(self) -> None:
        started = time.monotonic()
        proc = self.launch(self.cmd, ROOT, self.env)
        wait_for_port(self.port, proc, START_TIMEOUT_S, "streambus", self.log_path)
        self.start_seconds = time.monotonic() - started

    def stop(self) -> int:
        """SIGTERM and wait; the exit code (a graceful stop is 0)."""
        assert self.proc is not None
        return terminate(self.proc)

    def messages_produced_metric(self) -> float | None:
        """``streambus_messages_produced_total`` summed over series, from a real scrape."""
        if self.metrics_url is None:
            return None
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("streambus_messages_produced_total")
        )


@contextlib.contextmanager
def running_streambus(
    mode: str,
    sink: OtlpSink | None = None,
    parent: Path | None = None,
    keep_log: Path | None = None,
) -> Iterator[StreamBusServer]:
    """A started broker in a temporary directory under ``parent``; always stopped."""
    with tempfile.TemporaryDirectory(prefix=f"bench-streambus-{mode}-", dir=parent) as tmp:
        server = StreamBusServer(Path(tmp), mode, sink)
        try:
            server.start()
            yield server
        finally:
            server.kill()  # a no-op unless stop() was never reached
            server.keep_log(keep_log)
