"""Listeners and credentials across a three-broker cluster: every broker registers its
listeners, Metadata lists every broker at its address on the listener the client used, and
a credential created through one broker authenticates on the others."""

from __future__ import annotations

from pathlib import Path

from kafka.admin import KafkaAdminClient, UserScramCredentialUpsertion

from tests.harness import ClusterProcesses, free_port, wait_until

USER, PASSWORD = "alice", "alice-cluster-secret"
ENV = {
    "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": "3000",
    "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500",
    "PYTHONUNBUFFERED": "1",
}


def test_cluster_advertises_each_listener_and_shares_credentials(tmp_path: Path) -> None:
    cluster = ClusterProcesses(tmp_path, 3, env=ENV)
    sasl_ports: dict[int, int] = {}
    for node, broker in cluster.brokers.items():
        sasl_ports[node] = free_port()
        broker.extra = (
            *broker.extra,
            "--listeners",
            f"PLAINTEXT://127.0.0.1:{broker.port},SASL_PLAINTEXT://127.0.0.1:{sasl_ports[node]}",
        )
    with cluster as c:
        plain = {node: b.port for node, b in c.brokers.items()}
        admin = KafkaAdminClient(bootstrap_servers=c.brokers[1].bootstrap)
        try:
            assert wait_until(lambda: len(admin.describe_cluster()["brokers"]) == 3, timeout=60)
            brokers = admin.describe_cluster()["brokers"]
            assert sorted((x["broker_id"], x["port"]) for x in brokers) == sorted(plain.items())
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion("alice", "SCRAM-SHA-512", PASSWORD)]
            )
            assert errors == {"alice": None}
        finally:
            admin.close()

        def described_on(node: int) -> list[tuple[int, int]]:
            sasl = KafkaAdminClient(
                bootstrap_servers=f"127.0.0.1:{sasl_ports[node]}",
                security_protocol="SASL_PLAINTEXT",
                sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username="alice",
                sasl_plain_password=PASSWORD,
            )
            try:
                found = sasl.describe_cluster()["brokers"]
            finally:
                sasl.close()
            return sorted((x["broker_id"], x["port"]) for x in found)

        # the credential was replicated: it authenticates on broker 3, which lists every
        # broker at its SASL_PLAINTEXT address
        assert described_on(3) == sorted(sasl_ports.items())
