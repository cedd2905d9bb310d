"""deploy/cluster.py (`make cluster`): its options, the plan and the broker command lines it
builds, and its start/stop behaviour.

The start/stop tests run the launcher for real, as a process sent SIGINT/SIGTERM, with a
stand-in for `streambus serve` (a small Python script given with --streambus) that records its
argv and environment and stops on SIGTERM: what is tested is the launcher's process handling,
and the stand-in keeps that independent of the brokers' cluster mode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.harness import ROOT, free_port, wait_until

LAUNCHER = ROOT / "deploy" / "cluster.py"


def load_launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("streambus_cluster_launcher", LAUNCHER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cluster = load_launcher()


def plan(*argv: str, environ: dict[str, str] | None = None) -> Any:
    args, extra = cluster.parse_args(list(argv))
    return cluster.make_plan(args, extra, environ or {})


def option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


# ------------------------------------------------------------------ options and the plan


def test_defaults_are_three_nodes_on_the_documented_ports() -> None:
    p = plan("--streambus", "streambus")
    assert [n.node_id for n in p.nodes] == [1, 2, 3]
    assert [n.kafka_port for n in p.nodes] == [19092, 29092, 39092]
    assert [n.metrics_port for n in p.nodes] == [19090, 29090, 39090]
    assert [n.raft_port for n in p.nodes] == [19193, 29193, 39193]
    assert [n.data_dir for n in p.nodes] == [Path("cluster-data") / f"node-{i}" for i in (1, 2, 3)]
    assert p.host == "127.0.0.1"
    assert p.quorum == "1@127.0.0.1:19193,2@127.0.0.1:29193,3@127.0.0.1:39193"
    assert p.bootstrap == "127.0.0.1:19092,127.0.0.1:29092,127.0.0.1:39092"
    assert p.stop_timeout == 40
    assert p.log_dir is None
    assert p.extra_args == ()


def test_each_brokers_command_line() -> None:
    p = plan("--streambus", "/opt/sb/bin/streambus", "--", "--num-partitions", "3")
    for node in p.nodes:
        argv = p.command(node)
        assert argv[:2] == ["/opt/sb/bin/streambus", "serve"]
        assert option(argv, "--node-id") == str(node.node_id)
        assert option(argv, "--controller-quorum") == p.quorum
        assert option(argv, "--port") == str(node.kafka_port)
        assert option(argv, "--metrics-port") == str(node.metrics_port)
        assert option(argv, "--data-dir") == str(node.data_dir)
        assert option(argv, "--host") == "127.0.0.1"
        assert option(argv, "--advertised-host") == "127.0.0.1"
        assert option(argv, "--metrics-host") == "127.0.0.1"
        assert argv[-2:] == ["--num-partitions", "3"]
    # The Raft port comes from the quorum entry, which carries it for every voter.
    assert "--raft-port" not in p.command(p.nodes[0])


def test_the_secret_travels_in_the_environment_not_the_command_line() -> None:
    p = plan("--streambus", "streambus")
    assert p.secret_generated
    assert len(p.secret) >= 32
    assert plan("--streambus", "streambus").secret != p.secret  # random each time
    for node in p.nodes:
        assert p.secret not in " ".join(p.command(node))
    env = p.env({"PATH": "/usr/bin"})
    assert env["STREAMBUS_CLUSTER_SECRET"] == p.secret
    assert env["PATH"] == "/usr/bin"

    reused = plan("--streambus", "x", environ={"STREAMBUS_CLUSTER_SECRET": "from-env"})
    assert (reused.secret, reused.secret_generated) == ("from-env", False)
    given = plan("--streambus", "x", "--secret", "s3", environ={"STREAMBUS_CLUSTER_SECRET": "e"})
    assert (given.secret, given.secret_generated) == ("s3", False)


def test_bases_step_host_and_node_count_can_change() -> None:
    p = plan(
        "--streambus",
        "streambus",
        "--nodes",
        "5",
        "--kafka-port-base",
        "20000",
        "--metrics-port-base",
        "21000",
        "--raft-port-base",
        "22000",
        "--port-step",
        "10",
        "--host",
        "10.0.0.5",
        "--data-root",
        "/tmp/c",
    )
    assert [n.kafka_port for n in p.nodes] == [20000, 20010, 20020, 20030, 20040]
    assert [n.metrics_port for n in p.nodes] == [21000, 21010, 21020, 21030, 21040]
    assert [n.raft_port for n in p.nodes] == [22000, 22010, 22020, 22030, 22040]
    assert p.nodes[4].data_dir == Path("/tmp/c/node-5")
    assert p.quorum.split(",")[4] == "5@10.0.0.5:22040"


def test_free_ports_are_distinct() -> None:
    p = plan("--streambus", "streambus", "--free-ports")
    ports = [port for n in p.nodes for port in (n.kafka_port, n.metrics_port, n.raft_port)]
    assert len(set(ports)) == 9
    assert 19092 not in ports


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be between 1 and 9"),
        (["--nodes", "10"], "--nodes must be between 1 and 9"),
        (["--port-step", "0"], "--port-step must be positive"),
        (["--stop-timeout", "0"], "--stop-timeout must be positive"),
        (["--nodes", "three"], "invalid int value"),
        (["--kafka-port", "1"], "unrecognized arguments: --kafka-port"),
    ],
)
def test_bad_options_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cluster.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ports_out_of_range_or_colliding_are_refused() -> None:
    with pytest.raises(SystemExit, match=r"leave 1\.\.65535"):
        plan("--streambus", "x", "--kafka-port-base", "50000", "--port-step", "10000")
    with pytest.raises(SystemExit, match="collide"):
        plan("--streambus", "x", "--metrics-port-base", "19092")


def test_dry_run_prints_the_table_and_starts_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--dry-run", "--data-root", str(tmp_path / "cd")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "STREAMBUS_CLUSTER_SECRET": "not-printed"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "node  Kafka bootstrap  metrics" in out
    for n in (1, 2, 3):
        assert f"127.0.0.1:{n}9092  http://127.0.0.1:{n}9090/metrics  127.0.0.1:{n}9193" in out
        assert str(tmp_path / "cd" / f"node-{n}") in out
    assert "bootstrap servers: 127.0.0.1:19092,127.0.0.1:29092,127.0.0.1:39092" in out
    assert "kcat -b 127.0.0.1:19092,127.0.0.1:29092,127.0.0.1:39092 -L" in out
    assert "not-printed" not in out
    assert not (tmp_path / "cd").exists()


def test_a_generated_secret_is_printed_with_how_to_reuse_it() -> None:
    p = plan("--streambus", "streambus")
    text = cluster.describe(p)
    assert f"STREAMBUS_CLUSTER_SECRET={p.secret} make cluster" in text
    given = cluster.describe(plan("--streambus", "x", "--secret", "mine"))
    assert "mine" not in given


# ------------------------------------------------------------------ start and stop

STAND_IN = """\
import json, os, signal, sys, time
node = sys.argv[sys.argv.index("--node-id") + 1]
data = sys.argv[sys.argv.index("--data-dir") + 1]
with open(os.path.join(data, "argv.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "secret": os.environ.get("STREAMBUS_CLUSTER_SECRET")}, f)
if os.environ.get("STAND_IN_STUBBORN") == node:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    def stop(signum, frame):
        print(f"stand-in {node} got signal {signum}", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
print(f"stand-in {node} serving", flush=True)
while True:
    time.sleep(0.1)
"""


class Launch:
    def __init__(self, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        script = tmp_path / "stand_in.py"
        script.write_text(STAND_IN)
        self.data = tmp_path / "cd"
        self.out = tmp_path / "launcher.out"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(LAUNCHER),
                    "--streambus",
                    f"{sys.executable} {script}",
                    "--data-root",
                    str(self.data),
                    "--free-ports",
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def output(self) -> str:
        return self.out.read_text()

    def recorded(self, node: int) -> dict[str, Any]:
        path = self.data / f"node-{node}" / "argv.json"
        try:
            value: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return value

    def wait_serving(self) -> None:
        self.until(
            lambda: all(f"[node {n}] stand-in {n} serving" in self.output() for n in (1, 2, 3))
        )

    def until(self, predicate: Any) -> None:
        try:
            wait_until(predicate, timeout=30)
        except TimeoutError:
            raise AssertionError(self.output()) from None

    def stand_in_pids(self) -> list[int]:
        ps = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True, check=True)
        rows = [line.split() for line in ps.stdout.splitlines()[1:]]
        return [int(pid) for pid, ppid in rows if int(ppid) == self.proc.pid]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_broker_gracefully(tmp_path: Path, signum: int) -> None:
    launch = Launch(tmp_path, env={"STREAMBUS_CLUSTER_SECRET": "shared"})
    try:
        launch.wait_serving()
        pids = launch.stand_in_pids()
        assert len(pids) == 3
        for n in (1, 2, 3):
            recorded = launch.recorded(n)
            assert recorded["secret"] == "shared"  # noqa: S105
            assert recorded["argv"][recorded["argv"].index("--node-id") + 1] == str(n)
        launch.proc.send_signal(signum)
        assert launch.proc.wait(30) == 0, launch.output()
        out = launch.output()
        for n in (1, 2, 3):
            # each got SIGTERM once, from the launcher
            assert out.count(f"[node {n}] stand-in {n} got signal") == 1, out
            assert f"stand-in {n} got signal {int(signal.SIGTERM)}" in out
        assert "stopped: node 1 exit 0, node 2 exit 0, node 3 exit 0" in out
        for pid in pids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
    finally:
        launch.close()


def test_a_broker_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    launch = Launch(tmp_path, "--stop-timeout", "1", env={"STAND_IN_STUBBORN": "2"})
    try:
        launch.wait_serving()
        launch.proc.send_signal(signal.SIGINT)
        assert launch.proc.wait(30) == 1, launch.output()
        out = launch.output()
        assert "node 2 still running after 1s: killed" in out
        assert f"node 2 exit {-int(signal.SIGKILL)}" in out
        assert "node 1 exit 0" in out
        assert "node 3 exit 0" in out
    finally:
        launch.close()


def test_logs_can_go_to_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    launch = Launch(tmp_path, "--log-dir", str(logs))
    try:
        launch.until(
            lambda: all(
                (logs / f"node-{n}.log").exists()
                and f"stand-in {n} serving" in (logs / f"node-{n}.log").read_text()
                for n in (1, 2, 3)
            )
        )
        assert f"logs: {logs}/node-N.log" in launch.output()
        launch.proc.send_signal(signal.SIGTERM)
        assert launch.proc.wait(30) == 0, launch.output()
    finally:
        launch.close()


def test_a_taken_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = subprocess.run(
            [
                sys.executable,
                str(LAUNCHER),
                "--streambus",
                "false",
                "--data-root",
                str(tmp_path / "cd"),
                "--nodes",
                "1",
                "--kafka-port-base",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode != 0
    assert f"node 1's Kafka port 127.0.0.1:{port} is taken" in result.stderr
    assert not (tmp_path / "cd").exists()


def test_prometheus_config_scrapes_the_brokers_it_starts() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [s for s in config["scrape_configs"] if s["job_name"] == "streambus"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    p = plan("--streambus", "streambus")
    assert targets == [f"localhost:{node.metrics_port}" for node in p.nodes]


def test_make_cluster_runs_the_launcher_with_the_venvs_python() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "\ncluster: $(STAMP)\n\t$(BIN)/python deploy/cluster.py $(ARGS)\n" in makefile
    assert "cluster-data/" in (ROOT / ".gitignore").read_text().splitlines()
