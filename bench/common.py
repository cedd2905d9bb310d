"""Pieces shared by the benchmark modules: ports, processes, /proc readings, machine facts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka

ROOT = Path(__file__).resolve().parent.parent
# Lines of a broker log worth showing: Python's logging levels, Java's (slf4j/log4j), tracebacks.
LOG_PROBLEM = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL|SEVERE)\b|Traceback|Exception in")
STOP_TIMEOUT_S = 30.0


_PR_SET_PDEATHSIG = 1
# Looked up once here: a preexec_fn runs between fork and exec, where it must not start
# programs (find_library may run ldconfig).
_LIBC: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent() -> None:
    """``preexec_fn`` for servers: the kernel SIGKILLs the child when the bench process dies
    (even by SIGKILL), so no broker outlives a killed run. Linux only; a no-op elsewhere."""
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path
) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode} before listening on {port}:\n" + tail(log)
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file ('' if it is missing)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def terminate(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code (negative if signalled)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL ``proc`` if it still runs (the clean-up path of a failed run)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS); 0 if unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used, threads included (/proc; 0 if unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores, from /proc/stat.

    Busy is user + nice + system + irq + softirq: over a timed window, busy minus the broker's
    and the client's own CPU is what other processes took, the noise of a shared machine.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    ticks = [int(x) for x in fields[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq) / hz, steal / hz


def problem_lines(log: Path, ignore: re.Pattern[str] | None = None) -> list[str]:
    """WARNING/ERROR-level lines of a log file, minus those ``ignore`` matches."""
    if not log.exists():
        return []
    return [
        line
        for line in log.read_text(errors="replace").splitlines()
        if LOG_PROBLEM.search(line) and not (ignore is not None and ignore.search(line))
    ]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_total_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info() -> dict[str, Any]:
    """Facts about the machine and the software a result was measured with."""
    librdkafka_version, _ = confluent_kafka.libversion()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total_bytes(),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "confluent_kafka": importlib.metadata.version("confluent-kafka"),
        "librdkafka": librdkafka_version,
        "streambus_commit": _git_commit(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the machine was around a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class ServerProcess:
    """A broker the harness runs as a child process: its port, log, and readings of it.

    Subclasses build the command and say how a graceful stop looks; launching,
    killing and reading the process are the same for every system measured.
    """

    system = ""
    routine_warnings: re.Pattern[str] | None = None  # log lines that are not problems

    def __init__(self, work_dir: Path, log_name: str) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.log_path = work_dir / log_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(
        self,
        cmd: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with its output in the log; it dies with the harness. ``preexec``
        runs in the child before exec, after :func:`die_with_parent` (e.g. a lower rlimit)."""

        def child_setup() -> None:
            die_with_parent()
            if preexec is not None:
                preexec()

        with open(self.log_path, "wb") as log:
            self.proc = proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                preexec_fn=child_setup,  # noqa: PLW1509
            )
        return proc

    def kill(self) -> None:
        kill(self.proc)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def tail(self) -> str:
        return tail(self.log_path)

    def log_text(self) -> str:
        """The whole log so far ('' if there is none)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def tracebacks(self) -> int:
        """How many Python tracebacks the log holds."""
        return self.log_text().count("Traceback (most recent call last)")

    def problem_lines(self) -> list[str]:
        return problem_lines(self.log_path, self.routine_warnings)

    def keep_log(self, keep: Path | None) -> None:
        """Copy the log to ``keep`` (when given) before the work directory goes away."""
        if keep is not None and self.log_path.exists():
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, keep)


def run_and_report(
    runs: list[tuple[str, Callable[[], None]]],
    result: Any,
    render: Callable[[Any], str],
    out: Path,
    log_dir: Path,
) -> int:
    """Run each system's bench (one failing still reports the others), print the table,
    write the JSON; exit status 1 if any system failed. ``result`` is a dataclass with an
    ``errors`` list."""
    for system, run in runs:
        try:
            run()
        except Exception as exc:  # one system's failure still reports the other
            result.errors.append(f"{system}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    print()
    print(render(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    print(f"\nwrote {out}; broker logs in {log_dir}")
    for err in result.errors:
        print(f"FAILED: {err}", file=sys.stderr)
    return 1 if result.errors else 0
