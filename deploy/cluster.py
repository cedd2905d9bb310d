"""Start a StreamBus cluster of brokers on this machine (``make cluster``).

Each broker is a ``streambus serve`` process with its own node id, Kafka, metrics and Raft
ports and data directory under ``./cluster-data/node-N``; every broker is a voter of the
controller quorum. The cluster secret goes to the brokers through STREAMBUS_CLUSTER_SECRET,
not their command lines, so ``ps`` does not show it. The brokers' output is streamed here,
each line prefixed with its node id (or written to files with --log-dir). SIGINT (Ctrl+C) or
SIGTERM stops every broker with SIGTERM, waits for them to shut down gracefully, and kills
those still running after --stop-timeout seconds.

    make cluster                              # three brokers on 19092/29092/39092
    make cluster ARGS="--free-ports"          # any free ports instead
    make cluster ARGS="--dry-run"             # print the plan and the commands only
    make cluster ARGS="-- --num-partitions 3" # extra `streambus serve` options for every broker
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

SECRET_ENV = "STREAMBUS_CLUSTER_SECRET"  # noqa: S105 - the variable's name
# Node N gets base + (N - 1) * step: 19092, 29092, 39092 by default. None of them is a
# broker's own default (9092, 9090, 9193), so a single broker can run beside the cluster.
KAFKA_BASE = 19092
METRICS_BASE = 19090
RAFT_BASE = 19193
PORT_STEP = 10000
# Above the broker's own STREAMBUS_SHUTDOWN_TIMEOUT_S (30 s) so a graceful stop can finish.
STOP_TIMEOUT_S = 40.0
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Node:
    node_id: int
    kafka_port: int
    metrics_port: int
    raft_port: int
    data_dir: Path


@dataclass(frozen=True)
class Plan:
    host: str
    nodes: tuple[Node, ...]
    secret: str
    secret_generated: bool
    streambus: tuple[str, ...]
    extra_args: tuple[str, ...]
    log_dir: Path | None
    stop_timeout: float

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.host}:{node.kafka_port}" for node in self.nodes)

    @property
    def quorum(self) -> str:
        return ",".join(f"{node.node_id}@{self.host}:{node.raft_port}" for node in self.nodes)

    def command(self, node: Node) -> list[str]:
        """The argv of one broker (the secret travels in its environment, see env())."""
        return [
            *self.streambus,
            "serve",
            "--node-id",
            str(node.node_id),
            "--controller-quorum",
            self.quorum,
            "--host",
            self.host,
            "--port",
            str(node.kafka_port),
            "--advertised-host",
            self.host,
            "--metrics-host",
            self.host,
            "--metrics-port",
            str(node.metrics_port),
            "--data-dir",
            str(node.data_dir),
            *self.extra_args,
        ]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, SECRET_ENV: self.secret, "PYTHONUNBUFFERED": "1"}


def default_streambus() -> list[str]:
    """The `streambus` script beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "streambus"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("streambus")
    return [found] if found else [sys.executable, "-m", "streambus"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster.py",
        # No prefixes: --kafka-port would otherwise pass as --kafka-port-base.
        allow_abbrev=False,
        description="Start a StreamBus cluster on this machine; Ctrl+C stops it.",
        epilog="Arguments after -- are passed to every `streambus serve`.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="brokers (voters) to start (3)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every port binds to and brokers advertise (127.0.0.1); keep the Raft "
        "port on a private address",
    )
    parser.add_argument(
        "--kafka-port-base", type=int, default=KAFKA_BASE, help="node 1's Kafka port"
    )
    parser.add_argument(
        "--metrics-port-base", type=int, default=METRICS_BASE, help="node 1's /metrics port"
    )
    parser.add_argument("--raft-port-base", type=int, default=RAFT_BASE, help="node 1's Raft port")
    parser.add_argument(
        "--port-step", type=int, default=PORT_STEP, help="added to each port per node (10000)"
    )
    parser.add_argument(
        "--free-ports", action="store_true", help="take free ports from the OS instead of bases"
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("cluster-data"),
        help="node N's data dir is DATA_ROOT/node-N (./cluster-data)",
    )
    parser.add_argument(
        "--secret",
        help=f"cluster secret (default: ${SECRET_ENV}, else a new random one)",
    )
    parser.add_argument(
        "--log-dir", type=Path, help="write node-N.log files here instead of streaming the logs"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        help=f"seconds to wait for a graceful stop before killing ({STOP_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--streambus",
        help="the command that runs StreamBus (default: the streambus script of this Python)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and the commands, start nothing"
    )
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be between 1 and 9")
    if args.port_step < 1:
        parser.error("--port-step must be positive")
    if args.stop_timeout <= 0:
        parser.error("--stop-timeout must be positive")
    return args, extra


def free_ports(count: int, host: str) -> list[int]:
    """Ports the OS hands out as free, all held open together so none repeats."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def make_plan(args: argparse.Namespace, extra: Sequence[str], environ: dict[str, str]) -> Plan:
    count = args.nodes
    if args.free_ports:
        ports = free_ports(3 * count, args.host)
        kafka, metrics, raft = ports[:count], ports[count : 2 * count], ports[2 * count :]
    else:
        kafka, metrics, raft = (
            [base + i * args.port_step for i in range(count)]
            for base in (args.kafka_port_base, args.metrics_port_base, args.raft_port_base)
        )
    every = kafka + metrics + raft
    if len(set(every)) != len(every):
        raise SystemExit(f"cluster.py: these ports collide: {sorted(every)}; change a base")
    if not all(0 < port <= 65535 for port in every):
        raise SystemExit(
            f"cluster.py: ports {sorted(every)} leave 1..65535; lower a base or --port-step"
        )
    nodes = tuple(
        Node(i + 1, kafka[i], metrics[i], raft[i], args.data_root / f"node-{i + 1}")
        for i in range(count)
    )
    given = args.secret or environ.get(SECRET_ENV)
    streambus = shlex.split(args.streambus) if args.streambus else default_streambus()
    return Plan(
        host=args.host,
        nodes=nodes,
        secret=given or secrets.token_urlsafe(24),
        secret_generated=not given,
        streambus=tuple(streambus),
        extra_args=tuple(extra),
        log_dir=args.log_dir,
        stop_timeout=args.stop_timeout,
    )


def describe(plan: Plan) -> str:
    """The table and the how-to printed before the brokers start."""
    header = ("node", "Kafka bootstrap", "metrics", "Raft", "data dir")
    rows = [
        (
            str(node.node_id),
            f"{plan.host}:{node.kafka_port}",
            f"http://{plan.host}:{node.metrics_port}/metrics",
            f"{plan.host}:{node.raft_port}",
            str(node.data_dir),
        )
        for node in plan.nodes
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"StreamBus cluster of {len(plan.nodes)} brokers, controller quorum {plan.quorum}",
        "",
        *(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ),
        "",
        f"bootstrap servers: {plan.bootstrap}",
        f"  kcat -b {plan.bootstrap} -L",
        f"  echo 'k1:hello' | kcat -b {plan.bootstrap} -P -t demo -K:",
        f"  kcat -b {plan.bootstrap} -C -t demo -o beginning -e",
        "",
    ]
    if plan.secret_generated:
        lines += [
            "cluster secret: a new random one; to start the same cluster with it again:",
            f"  {SECRET_ENV}={plan.secret} make cluster",
        ]
    else:
        lines.append("cluster secret: the one given (--secret or $" + SECRET_ENV + ")")
    if plan.log_dir is not None:
        lines.append(f"logs: {plan.log_dir}/node-N.log")
    lines.append("The Raft ports must stay on a private address. Ctrl+C stops all brokers.")
    return "\n".join(lines)


class Cluster:
    """The running brokers: started together, their output relayed, stopped together."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._threads: list[threading.Thread] = []
        self._files: list[IO[bytes]] = []
        self._print_lock = threading.Lock()
        self._stopping = threading.Event()
        # Set by SIGINT/SIGTERM: wait() returns and main() stops the brokers.
        self.stop_requested = threading.Event()

    def say(self, line: str) -> None:
        with self._print_lock:
            print(line, flush=True)

    def start(self) -> None:
        env = self.plan.env(dict(os.environ))
        if self.plan.log_dir is not None:
            self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        for node in self.plan.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            out: int | IO[bytes] = subprocess.PIPE
            if self.plan.log_dir is not None:
                out = open(self.plan.log_dir / f"node-{node.node_id}.log", "ab")  # noqa: SIM115
                self._files.append(out)
            # A session of its own: Ctrl+C in the terminal reaches this launcher only, which
            # then stops each broker once, with SIGTERM.
            proc = subprocess.Popen(
                self.plan.command(node),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs[node.node_id] = proc
            if proc.stdout is not None:
                relay = threading.Thread(
                    target=self._relay, args=(node.node_id, proc.stdout), daemon=True
                )
                relay.start()
                self._threads.append(relay)
        watcher = threading.Thread(target=self._announce_ready, daemon=True)
        watcher.start()

    def _relay(self, node_id: int, stream: IO[bytes]) -> None:
        prefix = f"[node {node_id}] "
        for raw in iter(stream.readline, b""):
            self.say(prefix + raw.decode("utf-8", "replace").rstrip("\n"))
        stream.close()

    def _announce_ready(self) -> None:
        """Say once when every broker's Kafka port accepts connections."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = {node.node_id: node.kafka_port for node in self.plan.nodes}
        while waiting and time.monotonic() < deadline and not self._stopping.is_set():
            for node_id, port in list(waiting.items()):
                try:
                    socket.create_connection((self.plan.host, port), timeout=1).close()
                    del waiting[node_id]
                except OSError:
                    pass
            if waiting:
                self._stopping.wait(0.5)
        if not waiting:
            self.say(f"cluster ready: bootstrap servers {self.plan.bootstrap}")

    def wait(self) -> int:
        """Until every broker has exited (a broker that dies alone leaves the others running,
        as when a controller is killed to watch a failover); 0 when all exited cleanly."""
        reported: set[int] = set()
        while len(reported) < len(self.procs) and not self.stop_requested.is_set():
            for node_id, proc in self.procs.items():
                code = proc.poll()
                if code is not None and node_id not in reported:
                    reported.add(node_id)
                    if not self._stopping.is_set():
                        self.say(f"node {node_id} exited with code {code}")
            self.stop_requested.wait(0.2)
        return 0 if all(proc.returncode == 0 for proc in self.procs.values()) else 1

    def stop(self) -> int:
        """SIGTERM to every broker, wait up to stop_timeout for all, SIGKILL the rest."""
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.plan.stop_timeout
        for node_id, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"node {node_id} still running after {self.plan.stop_timeout:g}s: killed")
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(5)
        for file in self._files:
            file.close()
        codes = {node_id: proc.returncode for node_id, proc in self.procs.items()}
        self.say("stopped: " + ", ".join(f"node {n} exit {c}" for n, c in codes.items()))
        return 0 if all(code == 0 for code in codes.values()) else 1


def check_ports_free(plan: Plan) -> None:
    for node in plan.nodes:
        for what, port in (
            ("Kafka", node.kafka_port),
            ("metrics", node.metrics_port),
            ("Raft", node.raft_port),
        ):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((plan.host, port))
                except OSError as exc:
                    raise SystemExit(
                        f"cluster.py: node {node.node_id}'s {what} port {plan.host}:{port} is "
                        f"taken ({exc.strerror}); is a cluster already running? Otherwise pass "
                        "--free-ports or other bases."
                    ) from None


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    plan = make_plan(args, extra, dict(os.environ))
    print(describe(plan), flush=True)
    if args.dry_run:
        print()
        for node in plan.nodes:
            print(f"node {node.node_id}: {SECRET_ENV}=... {shlex.join(plan.command(node))}")
        return 0
    check_ports_free(plan)
    cluster = Cluster(plan)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # A second Ctrl+C while the brokers drain changes nothing: stop() kills them after
        # --stop-timeout anyway.
        cluster.stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    cluster.start()
    code = cluster.wait()
    if cluster.stop_requested.is_set():
        cluster.say("stopping the brokers (SIGTERM) ...")
        return cluster.stop()
    cluster.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
