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
import resource
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
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

    def __init__(
        self,
        work_dir: Path,
        mode: str = "metrics",
        sink: OtlpSink | None = None,
        *,
        data_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
        log_name: str = "broker.log",
    ) -> None:
        """``data_dir`` defaults to ``work_dir/data``; ``env`` adds ``STREAMBUS_*`` settings
        (after the cleaned caller environment); ``nofile`` lowers the broker's
        RLIMIT_NOFILE (soft and hard) to that many descriptors."""
        if mode not in MODES:
            raise ValueError(f"unknown telemetry mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "tracing" and sink is None:
            raise ValueError("tracing mode needs an OtlpSink to export to")
        super().__init__(work_dir, log_name)
        self.mode = mode
        self.metrics_port = 0 if mode in ("off", "sdk-disabled") else free_port()
        self.data_dir = work_dir / "data" if data_dir is None else data_dir
        self.nofile = nofile
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
            # No schema registry: several brokers run side by side here, and its default
            # port (8081) would be taken by the first.
            "--schema-registry-port",
            "0",
        ]
        child_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STREAMBUS_"))
        }
        # As the Kafka reference is configured: new groups do not wait for more members.
        child_env["STREAMBUS_GROUP_INITIAL_REBALANCE_DELAY_MS"] = "0"
        if mode == "tracing":
            assert sink is not None
            child_env.update(
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
            child_env["OTEL_SDK_DISABLED"] = "true"
        child_env.update(env or {})
        self.cmd = [sys.executable, "-m", "streambus", "serve", *args]
        self.env = child_env

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def _limit_files(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Launch and wait until the Kafka port accepts; raises if the broker exits first."""
        started = time.monotonic()
        proc = self.launch(self.cmd, ROOT, self.env, self._limit_files)
        wait_for_port(self.port, proc, timeout, "streambus", self.log_path)
        self.start_seconds = time.monotonic() - started

    def stop(self) -> int:
        """SIGTERM and wait; the exit code (a graceful stop is 0)."""
        assert self.proc is not None
        return terminate(self.proc)

    def metric_sum(self, contains: str, timeout: float = 10) -> float | None:
        """The sum of every sample whose name contains ``contains``, from a real scrape of
        /metrics; None without an endpoint or a series of that name."""
        if self.metrics_url is None:
            return None
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:  # noqa: S310
            text = response.read().decode()
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#") and contains in line.split("{", 1)[0].split()[0]
        ]
        return sum(values) if values else None

    def messages_produced_metric(self) -> float | None:
        """``streambus_messages_produced_total`` summed over series, from a real scrape."""
        return self.metric_sum("streambus_messages_produced_total")


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
