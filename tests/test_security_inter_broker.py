"""Brokers that talk to each other over SASL_SSL with SCRAM: replica fetches and transaction
markers travel over the inter-broker listener's TLS, authenticated as a super user, with the
ACL authorizer on; a broker with the wrong inter-broker password stays out of the ISR and says
why on one log line.

Each broker has two listeners: SASL_SSL (the inter-broker one, where clients produce too) and
SSL, where the test's admin presents a client certificate whose subject is a super user; that
is how the first SCRAM users of a cluster are made when no listener is anonymous."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    KafkaAdminClient,
    ResourcePattern,
    ResourceType,
    UserScramCredentialUpsertion,
)
from kafka.admin import NewTopic as KafkaNewTopic

from streambus.config import BrokerConfig
from streambus.errors import InvalidConfigError
from streambus.security.broker_client import InterBrokerSecurity
from tests.harness import ClusterProcesses, free_port, wait_until
from tests.security_certs import Certs, make_certs
from tests.test_replication import assert_replicas_identical, stop_all

MECHANISM = "SCRAM-SHA-512"
BROKER_USER, BROKER_PASSWORD = "broker", "broker-inter-secret"
APP_USER, APP_PASSWORD = "app", "app-secret"
ADMIN_PRINCIPAL = "User:CN=alice,O=StreamBus Tests"  # the client certificate's subject
ENV = {
    "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": "3000",
    "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500",
    "STREAMBUS_REPLICA_LAG_TIME_MAX_MS": "3000",
    "STREAMBUS_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "3",
    "STREAMBUS_OFFSETS_TOPIC_NUM_PARTITIONS": "3",
    "PYTHONUNBUFFERED": "1",
}
ASSIGNMENT = [[1, 2, 3], [2, 3, 1], [3, 1, 2]]  # partition p led by broker p + 1


class SecureCluster:
    """A three-broker cluster whose inter-broker listener is SASL_SSL (SCRAM-SHA-512), the
    authorizer on and the brokers' own user a super user."""

    def __init__(self, root: Path, wrong_password_on: int | None = None) -> None:
        self.certs: Certs = make_certs(root / "certs")
        good = root / "broker-password"
        good.write_text(BROKER_PASSWORD + "\n")
        bad = root / "wrong-password"
        bad.write_text("not-the-broker-password\n")
        self.cluster = ClusterProcesses(root, 3, env=ENV)
        self.ssl_ports: dict[int, int] = {}
        for node, broker in self.cluster.brokers.items():
            self.ssl_ports[node] = free_port()
            broker.extra = (
                *broker.extra,
                "--listeners",
                f"SASL_SSL://127.0.0.1:{broker.port},SSL://127.0.0.1:{self.ssl_ports[node]}",
                "--inter-broker-listener-name",
                "SASL_SSL",
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--ssl-cafile",
                str(self.certs.ca),
                "--ssl-client-auth",
                "requested",
                "--sasl-enabled-mechanisms",
                MECHANISM,
                "--sasl-mechanism-inter-broker-protocol",
                MECHANISM,
                "--inter-broker-sasl-username",
                BROKER_USER,
                "--inter-broker-sasl-password-file",
                str(bad if node == wrong_password_on else good),
                "--authorizer",
                "acl",
                "--super-users",
                f"User:{BROKER_USER};{ADMIN_PRINCIPAL}",
            )

    def __enter__(self) -> SecureCluster:
        self.cluster.__enter__()
        try:
            self._bootstrap_users()
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.__exit__(*exc)

    def ssl_admin(self, node: int = 1) -> KafkaAdminClient:
        return KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{self.ssl_ports[node]}",
            security_protocol="SSL",
            ssl_cafile=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert),
            ssl_keyfile=str(self.certs.client_key),
        )

    def _bootstrap_users(self) -> None:
        admin = self.ssl_admin()
        try:
            assert wait_until(lambda: len(admin.describe_cluster()["brokers"]) == 3, timeout=60)
            errors = admin.alter_user_scram_credentials(
                [
                    UserScramCredentialUpsertion(BROKER_USER, MECHANISM, BROKER_PASSWORD),
                    UserScramCredentialUpsertion(APP_USER, MECHANISM, APP_PASSWORD),
                ]
            )
            assert errors == {BROKER_USER: None, APP_USER: None}
            app = f"User:{APP_USER}"
            prefixed = ACLResourcePatternType.PREFIXED
            acls = [
                ACL(app, "*", ACLOperation.ALL, ACLPermissionType.ALLOW, pattern)
                for pattern in (
                    ResourcePattern(ResourceType.TOPIC, "secure-", prefixed),
                    ResourcePattern(ResourceType.TRANSACTIONAL_ID, "secure-", prefixed),
                )
            ]
            result = admin.create_acls(acls)
            assert not result["failed"], result
        finally:
            admin.close()

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka over SASL_SSL as the application user."""
        return {
            "bootstrap.servers": self.cluster.brokers[1].bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": APP_USER,
            "sasl.password": APP_PASSWORD,
            "ssl.ca.location": str(self.certs.ca),
            **extra,
        }

    def read_committed(self, topic: str, partitions: int, count: int) -> list[bytes]:
        """The values of ``topic`` a read_committed consumer reads, once it has ``count``."""
        consumer = Consumer(
            self.client_config(
                **{
                    "group.id": "unused",
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                }
            )
        )
        try:
            consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
            seen: list[bytes] = []

            def all_committed() -> bool:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    seen.append(msg.value())
                return len(seen) == count

            wait_until(all_committed, timeout=30, interval=0)
        finally:
            consumer.close()
        return seen

    def create_topic(self, topic: str, assignment: list[list[int]]) -> None:
        admin = self.ssl_admin()
        try:
            new = KafkaNewTopic(
                topic,
                replica_assignments=dict(enumerate(assignment)),
                topic_configs={"min.insync.replicas": "2"},
            )
            admin.create_topics([new])
        finally:
            admin.close()

    def isr(self, topic: str) -> dict[int, list[int]]:
        """partition -> ISR, as broker 1 reports it over SASL_SSL."""
        admin = AdminClient(self.client_config())
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        if found is None or found.error is not None:
            return {}
        return {p.id: sorted(p.isrs) for p in found.partitions.values()}


def produce(config: dict[str, Any], topic: str, count: int, partitions: int = 1) -> None:
    """``count`` values, round-robin over the partitions, each acknowledged without error."""
    errors: list[Any] = []
    producer = Producer({**config, "acks": "all", "enable.idempotence": True})
    on_delivery: Callable[[Any, Any], None] = lambda err, _msg: errors.append(err) if err else None  # noqa: E731
    for i in range(count):
        producer.produce(topic, f"v{i}".encode(), partition=i % partitions, on_delivery=on_delivery)
    assert producer.flush(60) == 0
    assert errors == []


def wait_isr(secure: SecureCluster, topic: str, want: dict[int, list[int]]) -> None:
    try:
        wait_until(lambda: secure.isr(topic) == want, timeout=45, interval=0.3)
    except TimeoutError:
        raise AssertionError(f"{topic}: ISR {secure.isr(topic)}, wanted {want}") from None


def test_replication_and_transaction_markers_over_sasl_ssl(tmp_path: Path) -> None:
    with SecureCluster(tmp_path) as secure:
        # acks=all over SASL_SSL; the followers copy over SASL_SSL as User:broker
        secure.create_topic("secure-orders", [[1, 2, 3]])
        produce(secure.client_config(), "secure-orders", 200)
        wait_isr(secure, "secure-orders", {0: [1, 2, 3]})

        # a transaction over three partitions led by three brokers: the coordinator writes
        # at least two of its markers to other brokers (WriteTxnMarkers, ClusterAction)
        secure.create_topic("secure-txn", ASSIGNMENT)
        producer = Producer(secure.client_config(**{"transactional.id": "secure-txn-1"}))
        producer.init_transactions(30)
        producer.begin_transaction()
        for i in range(30):
            producer.produce("secure-txn", f"t{i}".encode(), partition=i % 3)
        producer.commit_transaction(30)
        seen = secure.read_committed("secure-txn", 3, 30)
        assert sorted(seen) == sorted(f"t{i}".encode() for i in range(30))
        wait_isr(secure, "secure-txn", {p: [1, 2, 3] for p in range(3)})

        stop_all(secure.cluster)
        records = assert_replicas_identical(secure.cluster, [1, 2, 3], "secure-orders", 0)
        assert [r.value for r in records] == [f"v{i}".encode() for i in range(200)]
        for p in range(3):
            # every copy holds the partition's records and its commit marker, byte for byte
            txn = assert_replicas_identical(secure.cluster, [1, 2, 3], "secure-txn", p)
            assert len(txn) == 10
        for node, broker in secure.cluster.brokers.items():
            # while serving (its shutdown is not what this test is about)
            text = broker.log_text().partition(f"broker {node} stopping")[0]
            assert "Traceback" not in text, text[-3000:]


def test_wrong_inter_broker_password_keeps_a_broker_out_of_the_isr(tmp_path: Path) -> None:
    with SecureCluster(tmp_path, wrong_password_on=3) as secure:
        secure.create_topic("secure-lonely", [[1, 2, 3]])
        wait_isr(secure, "secure-lonely", {0: [1, 2]})
        produce(secure.client_config(), "secure-lonely", 20)
        # still out: its fetcher keeps retrying and keeps being refused
        assert secure.isr("secure-lonely") == {0: [1, 2]}
        log = secure.cluster.brokers[3]

        def refused() -> list[str]:
            return [
                line
                for line in log.log_text().splitlines()
                if "inter-broker authentication to broker 1" in line
            ]

        lines = wait_until(refused, timeout=10)
        assert len(lines) == 1, lines  # once, not once per retry
        assert "WARNING" in lines[0]
        assert MECHANISM in lines[0]
        assert "SASL_AUTHENTICATION_FAILED (58)" in lines[0]
        assert "not-the-broker-password" not in log.log_text()
        assert "Traceback" not in log.log_text()


def _config(tmp_path: Path, **values: Any) -> BrokerConfig:
    return BrokerConfig.load(
        {
            "data_dir": tmp_path,
            "controller_quorum": "1@127.0.0.1:9193,2@127.0.0.1:9194",
            "cluster_secret": "s",
            "listeners": "SASL_PLAINTEXT://127.0.0.1:0",
            **values,
        },
        env={},
    )


def test_a_sasl_inter_broker_listener_needs_the_brokers_credentials(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("from-the-file\n")
    ok = _config(
        tmp_path,
        inter_broker_sasl_username="broker",
        inter_broker_sasl_password_file=password,
        sasl_mechanism_inter_broker_protocol="scram-sha-256",
    )
    security = InterBrokerSecurity.from_config(ok)
    assert (security.mechanism, security.username, security.secret()) == (
        "SCRAM-SHA-256",
        "broker",
        "from-the-file",
    )
    refused = {
        "STREAMBUS_INTER_BROKER_SASL_USERNAME": {},
        "one way": {"inter_broker_sasl_username": "broker"},
        "not in sasl.enabled.mechanisms": {
            "inter_broker_sasl_username": "broker",
            "inter_broker_sasl_password": "p",
            "sasl_enabled_mechanisms": "PLAIN",
            "sasl_mechanism_inter_broker_protocol": "SCRAM-SHA-512",
        },
        "password file": {
            "inter_broker_sasl_username": "broker",
            "inter_broker_sasl_password_file": tmp_path / "missing",
        },
    }
    for message, values in refused.items():
        with pytest.raises(InvalidConfigError, match=message):
            _config(tmp_path, **values)
