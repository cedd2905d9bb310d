"""The first moments after a start: a broker never answers a login or an ACL check with
state it has not loaded. A ``streambus serve`` with SCRAM users and ACLs in its state is
restarted while two clients log in and produce from the moment its port opens: alice,
allowed to write, either succeeds or loses her connection (which a client retries), never
a refused password or a denial; bob, denied by an ACL (with
``allow.everyone.if.no.acl.found``, so an empty ACL set would let him through), is never
let through and never told his password is wrong. A single broker, then a Raft cluster
member, whose ACLs and credentials come from its replayed log."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourceType,
    UserScramCredentialUpsertion,
)
from kafka.protocol.producer import ProduceRequest
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest
from scramp import ScramClient

from streambus.errors import ERROR_BY_CODE
from streambus.records.batch import build_batch
from tests.harness import ROOT, BrokerProcess, ClusterProcesses, RawClient, free_port, wait_until

MECH = "SCRAM-SHA-256"
SECRETS = {"admin": "admin-pw-startup", "alice": "alice-pw-startup", "bob": "bob-pw-startup"}
TOPIC = "guarded"
ENV = {
    "STREAMBUS_AUTHORIZER": "acl",
    "STREAMBUS_SUPER_USERS": "User:admin",
    "STREAMBUS_ALLOW_EVERYONE_IF_NO_ACL_FOUND": "true",
    "STREAMBUS_BROKER_SESSION_TIMEOUT_MS": "3000",
    "STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500",
}
SASL_FAILED, TOPIC_DENIED = 58, 29
TD = ProduceRequest.TopicProduceData
USERS_ADD = [sys.executable, "-m", "streambus", "users", "add"]


def sasl_listener(broker: BrokerProcess) -> None:
    broker.extra = (*broker.extra, "--listeners", f"SASL_PLAINTEXT://127.0.0.1:{broker.port}")


def admin(bootstrap: str) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=MECH,
        sasl_plain_username="admin",
        sasl_plain_password=SECRETS["admin"],
    )


def grant(bootstrap: str) -> None:
    """The topic; WRITE allowed to alice, denied to bob."""
    a = admin(bootstrap)
    try:
        a.create_topics([NewTopic(TOPIC, 1, 1)])
        pattern = ResourcePattern(ResourceType.TOPIC, TOPIC, ACLResourcePatternType.LITERAL)
        result = a.create_acls(
            [
                ACL("User:alice", "*", ACLOperation.WRITE, ACLPermissionType.ALLOW, pattern),
                ACL("User:bob", "*", ACLOperation.WRITE, ACLPermissionType.DENY, pattern),
            ]
        )
        assert not result["failed"], result
    finally:
        a.close()


def attempt(bootstrap: str, user: str) -> str:
    """One login and one produce: 'ok', 'retriable' (a retriable produce error), an error
    code, 'closed' (connection lost or refused: what a client retries)."""
    try:
        with RawClient(bootstrap, timeout=30) as raw:
            if raw.request(SaslHandshakeRequest(mechanism=MECH), 1).error_code:
                return "handshake_failed"
            scram = ScramClient([MECH], user, SECRETS[user])
            first = raw.request(SaslAuthenticateRequest(auth_bytes=scram.get_client_first()), 1)
            if first.error_code:
                return f"sasl_{first.error_code}"
            scram.set_server_first(first.auth_bytes.decode())
            final = raw.request(SaslAuthenticateRequest(auth_bytes=scram.get_client_final()), 1)
            if final.error_code:
                return f"sasl_{final.error_code}"
            scram.set_server_final(final.auth_bytes.decode())
            records = build_batch([(b"k", user.encode(), [], int(time.time() * 1000))])
            partition = TD.PartitionProduceData(index=0, records=records)
            produce = ProduceRequest(
                transactional_id=None,
                acks=1,
                timeout_ms=5000,
                topic_data=[TD(name=TOPIC, partition_data=[partition])],
            )
            code = raw.request(produce, 8).responses[0].partition_responses[0].error_code
            if code and ERROR_BY_CODE[code].retriable:  # no leader yet: the cluster's start
                return "retriable"
            return "ok" if code == 0 else f"produce_{code}"
    except (ConnectionError, TimeoutError, OSError):
        return "closed"


def hammer_restart(bootstrap: str, start: Callable[[], None]) -> dict[str, Counter[str]]:
    """Restart through ``start`` while alice and bob each log in and produce in a loop,
    from before the port opens until alice has succeeded a few times."""
    outcomes: dict[str, Counter[str]] = {"alice": Counter(), "bob": Counter()}
    done = threading.Event()

    def loop(user: str) -> None:
        while not done.is_set():
            outcomes[user][attempt(bootstrap, user)] += 1

    threads = [threading.Thread(target=loop, args=(u,), daemon=True) for u in outcomes]
    for t in threads:
        t.start()
    try:
        start()
        assert wait_until(lambda: outcomes["alice"]["ok"] >= 5, timeout=90), outcomes
        assert wait_until(lambda: outcomes["bob"][f"produce_{TOPIC_DENIED}"] >= 5, timeout=30)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    return outcomes


def check(outcomes: dict[str, Counter[str]]) -> None:
    alice, bob = outcomes["alice"], outcomes["bob"]
    assert set(alice) <= {"ok", "retriable", "closed"}, alice
    assert set(bob) <= {f"produce_{TOPIC_DENIED}", "closed"}, bob
    assert alice["ok"] >= 5, alice


def test_single_broker_loads_acls_and_credentials_before_serving(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", env=ENV)
    sasl_listener(broker)
    broker.data_dir.mkdir()
    for user, password in SECRETS.items():  # the stopped broker's directory: how users start
        subprocess.run(
            [*USERS_ADD, user, "--password", password, "--data-dir", str(broker.data_dir)],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
    with broker:  # started
        grant(broker.bootstrap)
        broker.stop()
        outcomes = hammer_restart(broker.bootstrap, lambda: broker.start(wait=False))
    check(outcomes)


def test_cluster_member_waits_for_its_replicated_acls_and_credentials(tmp_path: Path) -> None:
    cluster = ClusterProcesses(tmp_path, 1, env={**ENV, "PYTHONUNBUFFERED": "1"})
    broker = cluster.brokers[1]
    # The PLAINTEXT listener (the inter-broker one) makes the users through the quorum
    # (anonymous: no ACL on the cluster, and allow.everyone.if.no.acl.found); the SASL one
    # is hammered.
    sasl = f"127.0.0.1:{free_port()}"
    broker.extra = (
        *broker.extra,
        "--listeners",
        f"PLAINTEXT://127.0.0.1:{broker.port},SASL_PLAINTEXT://{sasl}",
    )
    with cluster:
        setup = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            upserts = [UserScramCredentialUpsertion(u, MECH, p) for u, p in SECRETS.items()]
            assert setup.alter_user_scram_credentials(upserts) == dict.fromkeys(SECRETS)
        finally:
            setup.close()
        grant(sasl)
        broker.stop()
        outcomes = hammer_restart(sasl, lambda: broker.start(wait=False))
        check(outcomes)
        assert "ACLs and credentials caught up with the cluster" in broker.log_text()
