"""The observability example runs as a user runs it: summary, trace, serving until Ctrl+C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.harness import ROOT, free_port, scrape, total


def test_example_runs_serves_metrics_and_exits_zero_on_ctrl_c() -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "examples/observability/main.py",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--messages",
            "120",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "press Ctrl+C" in line:
                break
        output = "\n".join(lines)
        assert "press Ctrl+C" in output, output
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert total(samples, "streambus_messages_produced_total") == 120
        assert total(samples, "streambus_messages_consumed_total") == 120
        assert total(samples, "streambus_broker_status") == 2
        assert (
            total(samples, "streambus_consumer_group_members_total", group="observability-example")
            == 1
        )
        assert total(samples, "streambus_consumer_group_lag", group="observability-example") == 0
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "Messages produced:    120" in output
    assert "Messages consumed:    120" in output
    assert "Bytes produced:       0" not in output
    assert "group observability-example: 1 member(s), lag 0 messages" in output
    trace_lines = output.split("=== Trace ", 1)[1].splitlines()
    assert "[PRODUCER]" in trace_lines[1]
    assert any("produce observability-demo [SERVER]" in line for line in trace_lines)
    assert any("[CONSUMER]" in line for line in trace_lines)
    assert "Broker stopped" in rest
