"""ACLs on real SASL principals: SCRAM users alice and bob on a SASL_PLAINTEXT listener,
the ACL authorizer on, admin the super user; prefixed READ, DENY over a wildcard ALLOW,
group and transactional-id ACLs, each denial counted in a scrape and in the audit file
with its principal, beside the authentication events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourceType,
)

from tests.harness import BrokerThread, total, wait_until
from tests.test_security_auth import add_user

SECRETS = {"admin": "admin-pw-1", "alice": "alice-pw-2", "bob": "bob-pw-3"}
DENIALS = "streambus_authorization_denials_total"
MECH = "SCRAM-SHA-256"


def allow(principal: str, rtype: ResourceType, name: str, op: ACLOperation, **kw: Any) -> ACL:
    permission = kw.pop("permission", ACLPermissionType.ALLOW)
    pattern = kw.pop("pattern", ACLResourcePatternType.LITERAL)
    return ACL(principal, "*", op, permission, ResourcePattern(rtype, name, pattern))


def client_conf(b: BrokerThread, user: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": f"127.0.0.1:{b.broker.listener_port('SASL_PLAINTEXT')}",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": MECH,
        "sasl.username": user,
        "sasl.password": SECRETS[user],
    }


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def read_one(b: BrokerThread, user: str, topic: str, group: str) -> Any:
    """The first message or error a consumer of ``user`` in ``group`` gets from ``topic``."""
    c = Consumer({**client_conf(b, user), "group.id": group, "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got = wait_until(lambda: c.poll(0.5), timeout=30)
        return got.error() or got.value()
    finally:
        c.close()


def denied_read(b: BrokerThread, user: str, topic: str, audit: Path) -> None:
    """A consumer of ``user`` fetching ``topic`` gets no record, and the fetch's denial
    is in the audit file (librdkafka retries a refused fetch without surfacing it)."""
    c = Consumer({**client_conf(b, user), "group.id": f"{user}-g", "enable.auto.commit": False})
    wanted = (f"User:{user}", "READ", "TOPIC", topic)

    def refused() -> bool:
        msg = c.poll(0.2)
        assert msg is None or msg.error() is not None, msg.value()
        return any(
            (e["principal"], e["operation"], e["resource_type"], e["resource_name"]) == wanted
            for e in audit_lines(audit)
            if e["type"] == "authorization" and not e["allowed"]
        )

    try:
        c.assign([TopicPartition(topic, 0, 0)])
        wait_until(refused, timeout=30)
    finally:
        c.close()


def test_sasl_principals_under_acls(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    with BrokerThread(
        tmp_path / "data",
        listeners="SASL_PLAINTEXT://127.0.0.1:0",
        authorizer="acl",
        super_users="User:admin",
        audit_log=audit,
        connection_failed_authentication_delay_ms=1,
    ) as b:
        for user, password in SECRETS.items():
            add_user(b, user, password)
        conf = client_conf(b, "admin")
        a = KafkaAdminClient(
            bootstrap_servers=conf["bootstrap.servers"],
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism=MECH,
            sasl_plain_username="admin",
            sasl_plain_password=SECRETS["admin"],
        )
        try:
            a.create_topics([NewTopic(t, 1, 1) for t in ("pay-eu", "pay-us", "other")])
            prefixed = {"pattern": ACLResourcePatternType.PREFIXED}
            deny = {"permission": ACLPermissionType.DENY}
            result = a.create_acls(
                [
                    allow("User:alice", ResourceType.TOPIC, "pay-", ACLOperation.READ, **prefixed),
                    allow("User:alice", ResourceType.GROUP, "alice-g", ACLOperation.READ),
                    allow(
                        "User:alice", ResourceType.TRANSACTIONAL_ID, "pay-tx", ACLOperation.WRITE
                    ),
                    allow("User:bob", ResourceType.TOPIC, "*", ACLOperation.READ),
                    allow("User:bob", ResourceType.GROUP, "*", ACLOperation.READ),
                    allow("User:bob", ResourceType.TOPIC, "pay-eu", ACLOperation.READ, **deny),
                ]
            )
            assert not result["failed"], result
        finally:
            a.close()
        p = Producer(conf)
        for t in ("pay-eu", "pay-us", "other"):
            p.produce(t, b"v-" + t.encode())
        assert p.flush(30) == 0

        # alice: the pay- prefix and nothing else; Metadata hides the rest
        c = Consumer({**client_conf(b, "alice"), "group.id": "alice-g"})
        try:
            assert set(c.list_topics(timeout=10).topics) == {"pay-eu", "pay-us"}
        finally:
            c.close()
        assert read_one(b, "alice", "pay-us", "alice-g") == b"v-pay-us"

        # group ACL: alice may not use another group. Its FindCoordinator (DESCRIBE) or
        # OffsetCommit (READ) is refused; librdkafka may report _WAIT_COORD while it retries,
        # so the denial is looked for in the audit file, and a commit must never succeed.
        def group_denied() -> bool:
            return any(
                (e["principal"], e["resource_type"], e["resource_name"])
                == ("User:alice", "GROUP", "not-alice")
                for e in audit_lines(audit)
                if e["type"] == "authorization" and not e["allowed"]
            )

        c = Consumer({**client_conf(b, "alice"), "group.id": "not-alice"})
        try:

            def refused_commit() -> bool:
                try:
                    c.commit(offsets=[TopicPartition("pay-us", 0, 1)], asynchronous=False)
                except KafkaException as exc:
                    code = exc.args[0].code()
                    return code == KafkaError.GROUP_AUTHORIZATION_FAILED or group_denied()
                raise AssertionError("alice committed offsets in a group she may not use")

            wait_until(refused_commit, timeout=30, interval=0.5)
        finally:
            c.close()
        # transactional id ACL
        ok = Producer({**client_conf(b, "alice"), "transactional.id": "pay-tx"})
        ok.init_transactions(30)
        refused = Producer({**client_conf(b, "alice"), "transactional.id": "other-tx"})
        with pytest.raises(KafkaException) as caught:
            refused.init_transactions(30)
        assert caught.value.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED

        # bob: DENY on pay-eu wins over the ALLOW on *
        assert read_one(b, "bob", "pay-us", "bob-g") == b"v-pay-us"
        denied_read(b, "bob", "pay-eu", audit)

        samples = b.scrape()
        assert total(samples, DENIALS, operation="READ", resource_type="TOPIC") >= 1
        assert total(samples, DENIALS, resource_type="GROUP") >= 1
        # (refused at FindCoordinator, DESCRIBE, or InitProducerId, WRITE)
        assert total(samples, DENIALS, resource_type="TRANSACTIONAL_ID") >= 1

        def denials() -> set[tuple[str, str, str]]:
            return {
                (e["principal"], e["resource_type"], e["resource_name"])
                for e in audit_lines(audit)
                if e["type"] == "authorization" and not e["allowed"]
            }

        wanted = {
            ("User:alice", "TRANSACTIONAL_ID", "other-tx"),
            ("User:bob", "TOPIC", "pay-eu"),
        }
        wait_until(lambda: wanted <= denials(), timeout=15)
        logins = {
            (e["principal"], e["mechanism"], e["listener"], e["success"])
            for e in audit_lines(audit)
            if e["type"] == "authentication"
        }
        for user in SECRETS:
            assert (f"User:{user}", MECH, "SASL_PLAINTEXT", True) in logins
        text = audit.read_text()
        assert not any(secret in text for secret in SECRETS.values())
