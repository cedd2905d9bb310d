"""Where a StreamBus broker spends its CPU under one workload: py-spy samples it, this sums.

    python -m bench.profile --workload consume --value-bytes 1024
    python -m bench.profile --workload produce --value-bytes 100 --top 20

A broker is started in the `metrics` telemetry mode (as users run it), loaded
with data, and sampled by py-spy while one client produces or consumes. The
table lists functions by the share of samples in which they were running
(their own time), and the share in which they were anywhere on the stack.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.streambus_server import running_streambus
from bench.workloads import consume_throughput, create_topics, produce_throughput

PARTITIONS = 3
TOPIC = "profile"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit(
            "py-spy is needed and the project does not install it: .venv/bin/pip install py-spy"
        )
    return found


def _summarise(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            anywhere[frame] += count
    rows = [f"{'own %':>6} {'total %':>7}  function ({total} samples)"]
    for name, count in own.most_common(top):
        rows.append(f"{100 * count / total:6.1f} {100 * anywhere[name] / total:7.1f}  {name}")
    return "\n".join(rows)


def _short(frame: str) -> str:
    # py-spy's raw frames read "function (path/to/file.py:line)"; keep the function and file.
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({file})" if file else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=["produce", "consume"], default="consume")
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--messages", type=int, default=600_000)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    spy = _py_spy()
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp,
        running_streambus("metrics", parent=Path(tmp)) as broker,
    ):
        create_topics(broker.bootstrap, [TOPIC], PARTITIONS)
        raw = Path(tmp) / "profile.txt"

        def record(seconds: float) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(broker.pid),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "250",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        spy_proc: subprocess.Popen[bytes] | None = None
        if args.workload == "produce":
            spy_proc = record(5)
            threading.Timer(6, lambda: None).start()
        result = produce_throughput(
            broker.bootstrap,
            broker.pid,
            topic=TOPIC,
            value_bytes=args.value_bytes,
            acks="1",
            messages=args.messages,
            warmup_s=0.5,
        )
        if args.workload == "consume":
            spy_proc = record(4)
            time.sleep(0.3)
            result = consume_throughput(
                broker.bootstrap,
                broker.pid,
                topic=TOPIC,
                partitions=PARTITIONS,
                expected=args.messages,
                value_bytes=args.value_bytes,
                warmup=0,
            )
        assert spy_proc is not None
        spy_proc.wait(60)
        print(
            f"{args.workload} {args.value_bytes} B: {result.msgs_per_s:,.0f} msgs/s, "
            f"{result.mb_per_s:,.1f} MB/s while sampled"
        )
        print(_summarise(raw, args.top))
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
