"""Controller failover time of a three-broker cluster on this machine.

Starts three ``streambus serve`` processes (each a Raft voter), then, each round, SIGKILLs the
controller (the broker whose ``streambus_cluster_leader`` is 1), polls the survivors' /metrics
every 50 ms until one reports ``streambus_cluster_leader`` 1 in a higher ``streambus_raft_term``,
and restarts the killed broker, waiting until all three report ``streambus_cluster_size`` 3.
Prints each round's time from SIGKILL to the new controller, and the median; asserts nothing.

    .venv/bin/python -m bench.cluster_failover --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.harness import ClusterProcesses
from tests.test_cluster import (
    CLUSTER_ENV,
    kill_controller,
    metrics_of,
    restart,
    wait_cluster_size,
)

METRICS = (
    "streambus_cluster_size",
    "streambus_cluster_leader",
    "streambus_controller_id",
    "streambus_raft_term",
    "streambus_raft_commit_index",
    "streambus_partitions_leader",
    "streambus_offline_partitions",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the brokers' logs here (default: discarded)"
    )
    args = parser.parse_args()
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, ClusterProcesses(Path(tmp), 3, env=CLUSTER_ENV) as c:
        try:
            started = time.monotonic()
            wait_cluster_size(c, 3)
            print(f"cluster of 3 ready in {time.monotonic() - started:.2f}s")
            for round_ in range(1, args.rounds + 1):
                old, term, new, elapsed = kill_controller(c)
                times.append(elapsed)
                print(
                    f"round {round_}: controller {old} killed in term {term:g}; "
                    f"broker {new} controller after {elapsed * 1000:.0f} ms",
                    flush=True,
                )
                rejoin = time.monotonic()
                restart(c, old)
                print(f"  broker {old} back in the cluster {time.monotonic() - rejoin:.2f}s")
            for name in (
                "streambus_cluster_size",
                "streambus_cluster_leader",
                "streambus_raft_term",
            ):
                print(f"{name}: {metrics_of(c, name)}")
        finally:
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("*.log"):
                    (args.keep_logs / log.name).write_bytes(log.read_bytes())
    print(
        "failover (SIGKILL -> new controller): "
        + ", ".join(f"{t * 1000:.0f}" for t in times)
        + f" ms; median {statistics.median(times) * 1000:.0f} ms over {len(times)} rounds"
    )


if __name__ == "__main__":
    main()
