"""ACLs with the authorizer on: managed through Kafka's admin APIs, kept across restarts,
enforced with Kafka's semantics on real clients, every denial counted and audited.

Every client is User:ANONYMOUS here (no authentication on a PLAINTEXT listener), so
ACLs name that principal; a test that needs a second principal gives it ACLs the
anonymous one must not get, and checks the anonymous one is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from kafka import KafkaAdminClient
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)
from kafka.errors import SecurityDisabledError

from tests.harness import BrokerThread, total, wait_until

ANON = "User:ANONYMOUS"
ROOT = Path(__file__).resolve().parents[1]
KAFKA_TOOLS = ROOT / ".tools" / "kafka-tools-4.4.0" / "libs"


def acl(
    resource: ResourceType,
    name: str,
    op: ACLOperation,
    *,
    permission: ACLPermissionType = ACLPermissionType.ALLOW,
    pattern: ACLResourcePatternType = ACLResourcePatternType.LITERAL,
    principal: str = ANON,
) -> ACL:
    return ACL(principal, "*", op, permission, ResourcePattern(resource, name, pattern))


ALL_ACLS = ACLFilter(
    principal=None,
    host=None,
    operation=ACLOperation.ANY,
    permission_type=ACLPermissionType.ANY,
    resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
)


def admin(broker: BrokerThread) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def secured(tmp_path: Path, **config: Any) -> BrokerThread:
    """A broker with the authorizer on; the test's ACLs are created by a super user
    through the broker's own API surface before the super user is dropped."""
    return BrokerThread(
        tmp_path, authorizer="acl", audit_log=tmp_path / "audit" / "audit.log", **config
    )


def grant(tmp_path: Path, acls_: list[ACL], topics: list[str] = ()) -> None:  # type: ignore[assignment]
    """Create topics and ACLs as a super user, on a broker over the same data dir."""
    with BrokerThread(tmp_path, authorizer="acl", super_users=ANON) as b:
        a = admin(b)
        try:
            if topics:
                a.create_topics([NewTopic(t, 1, 1) for t in topics])
            if acls_:
                result = a.create_acls(acls_)
                assert not result["failed"], result
        finally:
            a.close()


def test_acl_admin_round_trip_survives_restart(tmp_path: Path) -> None:
    wanted = [
        acl(
            ResourceType.TOPIC,
            "orders-",
            ACLOperation.READ,
            pattern=ACLResourcePatternType.PREFIXED,
        ),
        acl(ResourceType.GROUP, "g1", ACLOperation.READ, principal="User:alice"),
        acl(ResourceType.TOPIC, "secret", ACLOperation.ALL, permission=ACLPermissionType.DENY),
    ]
    with BrokerThread(tmp_path, authorizer="acl", super_users=ANON) as b:
        a = admin(b)
        try:
            assert not a.create_acls(wanted)["failed"]
            # an invalid binding (CLUSTER must be named kafka-cluster) fails alone
            bad = acl(ResourceType.CLUSTER, "other", ACLOperation.ALTER)
            assert len(a.create_acls([bad])["failed"]) == 1
            found, _err = a.describe_acls(ALL_ACLS)
            assert {(x.principal, x.resource_pattern.resource_name) for x in found} == {
                (ANON, "orders-"),
                ("User:alice", "g1"),
                (ANON, "secret"),
            }
        finally:
            a.close()
    with BrokerThread(tmp_path, authorizer="acl", super_users=ANON) as b:
        a = admin(b)
        try:
            found, _ = a.describe_acls(ALL_ACLS)
            assert len(found) == 3
            # MATCH: every binding applying to topic orders-eu (the prefix)
            match = ACLFilter(
                principal=None,
                host=None,
                operation=ACLOperation.ANY,
                permission_type=ACLPermissionType.ANY,
                resource_pattern=ResourcePatternFilter(
                    ResourceType.TOPIC, "orders-eu", ACLResourcePatternType.MATCH
                ),
            )
            deleted = a.delete_acls([match])
            assert [x.resource_pattern.resource_name for x in deleted[0][1]] == ["orders-"]
            found, _ = a.describe_acls(ALL_ACLS)
            assert len(found) == 2
        finally:
            a.close()
    with BrokerThread(tmp_path, authorizer="acl", super_users=ANON) as b:
        a = admin(b)
        try:
            found, _ = a.describe_acls(ALL_ACLS)
            assert sorted(x.resource_pattern.resource_name for x in found) == ["g1", "secret"]
        finally:
            a.close()


def test_acl_apis_answer_security_disabled_without_authorizer(tmp_path: Path) -> None:
    with BrokerThread(tmp_path) as b:
        a = admin(b)
        try:
            with pytest.raises(SecurityDisabledError):
                a.describe_acls(ALL_ACLS)
        finally:
            a.close()


def test_prefixed_read_reads_those_topics_only_and_denials_are_counted_and_audited(
    tmp_path: Path,
) -> None:
    grant(
        tmp_path,
        [
            acl(
                ResourceType.TOPIC,
                "pay-",
                ACLOperation.READ,
                pattern=ACLResourcePatternType.PREFIXED,
            ),
            acl(
                ResourceType.TOPIC,
                "pay-",
                ACLOperation.WRITE,
                pattern=ACLResourcePatternType.PREFIXED,
            ),
            acl(ResourceType.GROUP, "readers", ACLOperation.READ),
            acl(ResourceType.CLUSTER, "kafka-cluster", ACLOperation.IDEMPOTENT_WRITE),
        ],
        topics=["pay-eu", "pay-us", "other"],
    )
    audit = tmp_path / "audit" / "audit.log"
    with secured(tmp_path) as b:
        p = Producer({"bootstrap.servers": b.bootstrap})
        for t in ("pay-eu", "pay-us"):
            p.produce(t, b"v-" + t.encode())
        assert p.flush(30) == 0
        # Metadata for every topic shows the readable ones only
        listed = set(p.list_topics(timeout=10).topics)
        assert {"pay-eu", "pay-us"} <= listed
        assert "other" not in listed
        # producing to "other" is refused with TOPIC_AUTHORIZATION_FAILED
        errors: list[Any] = []
        p.produce("other", b"x", on_delivery=lambda err, msg: errors.append(err))
        p.flush(30)
        assert errors
        assert errors[0] is not None
        assert errors[0].code() in (29,), errors[0]
        # a consumer in the allowed group reads the prefix
        c = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": "readers",
                "auto.offset.reset": "earliest",
            }
        )
        c.subscribe(["pay-eu"])
        got = []
        wait_until(lambda: _poll_into(c, got) and len(got) >= 1, timeout=30)
        assert got[0] == b"v-pay-eu"
        c.close()
        # every denial counted (through a real scrape) and audited
        denials = wait_until(
            lambda: total(
                b.scrape(),
                "streambus_authorization_denials_total",
                resource_type="TOPIC",
            ),
            timeout=15,
        )
        assert denials >= 1
        lines = wait_until(lambda: [x for x in audit_lines(audit) if not x["allowed"]], timeout=15)
        assert any(
            x["operation"] in ("DESCRIBE", "WRITE") and x["resource_name"] == "other" for x in lines
        ), lines
        assert all(x["principal"] == ANON and x["type"] == "authorization" for x in lines)
        samples = b.scrape()
        assert total(samples, "streambus_authorization_checks_total") > total(
            samples, "streambus_authorization_denials_total"
        )
        all_denials = total(samples, "streambus_authorization_denials_total")
        audited = wait_until(
            lambda: (
                total(b.scrape(), "streambus_audit_events_logged_total", type="authorization")
                >= all_denials
                and len([x for x in audit_lines(audit) if not x["allowed"]]) >= all_denials
            ),
            timeout=15,
        )
        assert audited


def _poll_into(c: Consumer, got: list[bytes]) -> bool:
    m = c.poll(1.0)
    if m is not None and m.error() is None:
        got.append(m.value())
    return True


def test_deny_overrides_allow_and_super_user_passes(tmp_path: Path) -> None:
    grant(
        tmp_path,
        [
            acl(ResourceType.TOPIC, "*", ACLOperation.ALL),
            acl(ResourceType.CLUSTER, "kafka-cluster", ACLOperation.ALL),
            acl(
                ResourceType.TOPIC,
                "locked",
                ACLOperation.DESCRIBE,
                permission=ACLPermissionType.DENY,
            ),
        ],
        topics=["open", "locked"],
    )
    with secured(tmp_path) as b:
        a = admin(b)
        try:
            names = set(a.list_topics())
            assert "open" in names
            assert "locked" not in names
            meta = a.describe_topics(["locked"])
            assert meta[0]["error_code"] == 29
        finally:
            a.close()
    with secured(tmp_path, super_users="User:bob;User:ANONYMOUS") as b:
        a = admin(b)
        try:
            assert {"open", "locked"} <= set(a.list_topics())
        finally:
            a.close()


def test_group_and_transactional_id_acls_are_enforced(tmp_path: Path) -> None:
    grant(
        tmp_path,
        [
            acl(ResourceType.TOPIC, "t", ACLOperation.ALL),
            acl(ResourceType.GROUP, "good", ACLOperation.READ),
            acl(ResourceType.TRANSACTIONAL_ID, "tx-good", ACLOperation.WRITE),
        ],
        topics=["t"],
    )
    audit = tmp_path / "audit" / "audit.log"
    with secured(tmp_path) as b:
        # a transactional producer with an allowed id commits
        p = Producer({"bootstrap.servers": b.bootstrap, "transactional.id": "tx-good"})
        p.init_transactions(30)
        p.begin_transaction()
        p.produce("t", b"in-txn")
        p.commit_transaction(30)
        # another id is refused: TRANSACTIONAL_ID_AUTHORIZATION_FAILED
        bad = Producer({"bootstrap.servers": b.bootstrap, "transactional.id": "tx-bad"})
        with pytest.raises(KafkaException) as info:
            bad.init_transactions(30)
        assert info.value.args[0].code() == 53, info.value
        # a group without READ: GROUP_AUTHORIZATION_FAILED to the consumer
        c = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": "bad-group",
                "auto.offset.reset": "earliest",
            }
        )
        c.subscribe(["t"])
        codes: list[int] = []

        def polled() -> bool:
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                codes.append(m.error().code())
            return 30 in codes

        wait_until(polled, timeout=30)
        c.close()
        lines = wait_until(
            lambda: [
                x for x in audit_lines(audit) if x["resource_type"] in ("GROUP", "TRANSACTIONAL_ID")
            ],
            timeout=15,
        )
        kinds = {(x["resource_type"], x["resource_name"]) for x in lines}
        assert ("TRANSACTIONAL_ID", "tx-bad") in kinds
        assert ("GROUP", "bad-group") in kinds
        samples = b.scrape()
        assert total(samples, "streambus_authorization_denials_total", resource_type="GROUP") >= 1
        assert (
            total(
                samples,
                "streambus_authorization_denials_total",
                resource_type="TRANSACTIONAL_ID",
            )
            >= 1
        )


@pytest.mark.skipif(
    not KAFKA_TOOLS.is_dir() or shutil.which("java") is None,
    reason="Kafka's tools jars are not at .tools/kafka-tools-4.4.0/libs",
)
def test_kafka_acls_tool(tmp_path: Path) -> None:
    with BrokerThread(tmp_path, authorizer="acl", super_users=ANON) as b:
        base = ["java", "-cp", f"{KAFKA_TOOLS}/*", "org.apache.kafka.tools.AclCommand"]
        server = ["--bootstrap-server", b.bootstrap]
        topic = f"tool-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "KAFKA_HEAP_OPTS": "-Xmx256m"}
        subprocess.run(
            [*base, *server, "--add", "--allow-principal", "User:carol", "--operation", "Read",
             "--topic", topic, "--resource-pattern-type", "prefixed"],
            check=True, capture_output=True, timeout=120, env=env,
        )  # fmt: skip
        listed = subprocess.run(
            [*base, *server, "--list", "--topic", topic, "--resource-pattern-type", "any"],
            check=True, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert "User:carol" in listed.stdout, listed.stdout
        assert "READ" in listed.stdout, listed.stdout
        subprocess.run(
            [*base, *server, "--remove", "--force", "--allow-principal", "User:carol",
             "--operation", "Read", "--topic", topic, "--resource-pattern-type", "prefixed"],
            check=True, capture_output=True, timeout=120, env=env,
        )  # fmt: skip
        a = admin(b)
        try:
            found, _ = a.describe_acls(ALL_ACLS)
            assert not found
        finally:
            a.close()
