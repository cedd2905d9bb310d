"""The replicated reference: three Apache Kafka nodes, each broker and KRaft controller in one
JVM (``process.roles=broker,controller``), forming one cluster on 127.0.0.1.

Each node is a :class:`bench.kafka.KafkaServer` (same jars, JVM flags and logging) with its own
``node.id``, a free client port and a free controller port, and the same static
``controller.quorum.voters`` naming all three. Every node's storage is formatted with one random
cluster id (``kafka.tools.StorageTool format``), the three JVMs are started together (a KRaft
quorum needs a majority before any broker registers), and the cluster is ready once the
metadata lists all three brokers. Internal topics are created with replication factor 3 and
``min.insync.replicas`` 2, as a production cluster would have them. :meth:`KafkaCluster.stop`
SIGTERMs the three nodes (a controlled shutdown each); :meth:`KafkaCluster.kill` is the
clean-up path.

Run by hand: ``python -m bench.kafka_cluster [--seconds N]`` (a cluster until Ctrl+C).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient

from bench.common import free_port, terminate, wait_for_port
from bench.kafka import START_TIMEOUT_S, KafkaHome, KafkaServer, ensure_kafka, random_cluster_id

NODES = 3
STOP_TIMEOUT_S = 30.0


class KafkaClusterNode(KafkaServer):
    """One node of a :class:`KafkaCluster`: ``node_id`` among ``voters``."""

    def __init__(
        self,
        work_dir: Path,
        home: KafkaHome,
        *,
        node_id: int,
        controller_port: int,
        voters: str,
        cluster_id: str,
    ) -> None:
        super().__init__(work_dir, home)
        self.node_id = node_id
        self.controller_port = controller_port
        self.voters = voters
        self.cluster_id = cluster_id

    def properties(self) -> dict[str, str]:
        props = super().properties()
        props.update(
            {
                "node.id": str(self.node_id),
                "controller.quorum.voters": self.voters,
                "offsets.topic.replication.factor": "3",
                "transaction.state.log.replication.factor": "3",
                "transaction.state.log.min.isr": "2",
                "share.coordinator.state.topic.replication.factor": "3",
                "share.coordinator.state.topic.min.isr": "2",
            }
        )
        return props

    def launch_node(self) -> None:
        self.launch(self._java("kafka.Kafka", str(self.config_path)), self.work_dir)


class KafkaCluster:
    """Three Kafka nodes in ``work_dir/node-<id>``; :meth:`start`, then :meth:`stop`."""

    def __init__(self, work_dir: Path, home: KafkaHome, size: int = NODES) -> None:
        self.work_dir = work_dir
        self.home = home
        controller_ports = {node: free_port() for node in range(1, size + 1)}
        voters = ",".join(f"{n}@127.0.0.1:{p}" for n, p in controller_ports.items())
        cluster_id = random_cluster_id()
        self.nodes: dict[int, KafkaClusterNode] = {}
        for node, port in controller_ports.items():
            node_dir = work_dir / f"node-{node}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes[node] = KafkaClusterNode(
                node_dir,
                home,
                node_id=node,
                controller_port=port,
                voters=voters,
                cluster_id=cluster_id,
            )
        self.start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes.values())

    def start(self) -> None:
        started = time.monotonic()
        for node in self.nodes.values():
            node.format_storage(node.cluster_id)
        for node in self.nodes.values():
            node.launch_node()
        for node in self.nodes.values():
            assert node.proc is not None
            wait_for_port(node.port, node.proc, START_TIMEOUT_S, "kafka", node.log_path)
        self._wait_ready(started + START_TIMEOUT_S)
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        """Until every node's metadata lists all the brokers (registered and unfenced)."""
        admins = [AdminClient({"bootstrap.servers": n.bootstrap}) for n in self.nodes.values()]
        while True:
            for node in self.nodes.values():
                assert node.proc is not None
                if node.proc.poll() is not None:
                    raise RuntimeError(
                        f"kafka node {node.node_id} exited with {node.proc.returncode}:\n"
                        + node.tail()
                    )
            seen: list[int] = []
            for admin in admins:
                with contextlib.suppress(Exception):
                    seen.append(len(admin.list_topics(timeout=2).brokers))
            if seen == [len(self.nodes)] * len(self.nodes):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"kafka cluster not ready after {START_TIMEOUT_S:.0f}s (brokers seen {seen})"
                )
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes.values()]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM every node at once, then wait (SIGKILL after ``timeout``); 0 when all
        exited cleanly. One at a time, the last node would wait out its controlled shutdown
        on a quorum that is gone."""
        procs = [node.proc for node in self.nodes.values() if node.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [terminate(proc, timeout) for proc in procs]
        clean = (0, 128 + signal.SIGTERM, -signal.SIGTERM)
        return next((c for c in codes if c not in clean), 0)

    def kill(self) -> None:
        for node in self.nodes.values():
            node.kill()

    def keep_logs(self, keep_dir: Path | None) -> None:
        if keep_dir is not None:
            for node_id, node in self.nodes.items():
                node.keep_log(keep_dir / f"kafka-cluster-node-{node_id}.log")


@contextlib.contextmanager
def running_kafka_cluster(
    home: KafkaHome, parent: Path | None = None, keep_logs: Path | None = None
) -> Iterator[KafkaCluster]:
    """A started three-node cluster in a temporary directory under ``parent``; always stopped."""
    with tempfile.TemporaryDirectory(prefix="bench-kafka-cluster-", dir=parent) as tmp:
        cluster = KafkaCluster(Path(tmp), home)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.kill()  # a no-op for nodes stop() already stopped
            cluster.keep_logs(keep_logs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_cluster", description=__doc__)
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long")
    args = parser.parse_args(argv)
    home = ensure_kafka()
    with running_kafka_cluster(home) as cluster:
        print(
            f"Kafka {home.version}, {len(cluster.nodes)} nodes on {cluster.bootstrap}, "
            f"started in {cluster.start_seconds:.1f} s",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            if args.seconds:
                time.sleep(args.seconds)
            else:
                signal.pause()
        code = cluster.stop()
        for node in cluster.nodes.values():
            print(f"  node {node.node_id}: {len(node.problem_lines())} WARN/ERROR lines")
    return code


if __name__ == "__main__":
    sys.exit(main())
