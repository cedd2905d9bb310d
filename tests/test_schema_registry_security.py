"""The schema registry's REST API with HTTP Basic authentication against the broker's
SCRAM users and with subject ACLs (Confluent's topic-based mode) through the broker's
authorizer: Confluent's client, raw HTTP, a real /metrics scrape and the audit log."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streambus.cluster import acls
from streambus.cluster.records import AlterAcls
from streambus.cluster.scram_credentials import record_for
from streambus.schemas import forward
from streambus.schemas.auth import subject_topic
from streambus.schemas.forward import SchemasLeader
from streambus.security.credentials import make_credential
from tests.harness import BrokerThread, free_port, total, wait_until

PASSWORD = "secret-correct-horse"  # noqa: S105 - a test user's
WRONG = "wrong-password-XYZZY"
CT = "application/vnd.schemaregistry.v1+json"
FAILURES = "streambus_authentication_failures_total"
ATTEMPTS = "streambus_authentication_attempts_total"
LABELS = {"mechanism": "BASIC", "listener": "schema-registry"}


def avro(name: str) -> str:
    return json.dumps(
        {"type": "record", "name": name, "fields": [{"name": "id", "type": "string"}]}
    )


def add_user(b: BrokerThread, user: str, password: str, mechanisms: tuple[str, ...]) -> None:
    for mechanism in mechanisms:
        record = record_for(user, mechanism, make_credential(mechanism, password))
        assert b.call(b.broker.credentials.submit(record)).ok


def url(b: BrokerThread) -> str:
    return f"http://127.0.0.1:{b.broker.schema_registry_port}"


def client(b: BrokerThread, user: str, password: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": url(b), "basic.auth.user.info": f"{user}:{password}"})


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("srbasic")
    with BrokerThread(
        data / "data",
        schema_registry_port=free_port(),
        schema_registry_authentication="basic",
        audit_log=data / "audit.log",
    ) as b:
        add_user(b, "alice", PASSWORD, ("SCRAM-SHA-256",))
        add_user(b, "carol", PASSWORD, ("SCRAM-SHA-512",))
        yield b


def test_subject_maps_to_its_topic() -> None:
    assert subject_topic("pay-orders-value") == "pay-orders"
    assert subject_topic("pay-orders-key") == "pay-orders"
    assert subject_topic("com.example.Order") == "com.example.Order"
    assert subject_topic("-value") == "-value"


def test_basic_auth_registers_and_reads_with_confluent_client(basic: BrokerThread) -> None:
    for user in ("alice", "carol"):  # a SCRAM-SHA-256 and a SCRAM-SHA-512 credential
        with client(basic, user, PASSWORD) as sr:
            subject = f"{user}-orders-value"
            schema_id = sr.register_schema(subject, Schema(avro("Order"), "AVRO"))
            latest = sr.get_latest_version(subject)
            assert latest.schema_id == schema_id
            assert json.loads(sr.get_schema(schema_id).schema_str)["name"] == "Order"
            assert subject in sr.get_subjects()


def test_missing_or_wrong_credentials_get_401_counted_audited_never_logged(
    basic: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streambus")
    before = basic.scrape()
    missing = httpx.get(url(basic) + "/subjects")
    wrong = httpx.get(url(basic) + "/subjects", auth=("alice", WRONG))
    unknown = httpx.get(url(basic) + "/subjects", auth=("mallory", WRONG))
    garbled = httpx.get(url(basic) + "/subjects", headers={"Authorization": "Basic !!!"})
    for response in (missing, wrong, unknown, garbled):
        assert response.status_code == 401
        assert response.json()["error_code"] == 40101
        assert response.headers["WWW-Authenticate"] == 'Basic realm="StreamBus Schema Registry"'
    ok = httpx.get(url(basic) + "/subjects", auth=("alice", PASSWORD))
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith(CT)
    with client(basic, "alice", WRONG) as sr, pytest.raises(SchemaRegistryError) as info:
        sr.get_subjects()
    assert info.value.http_status_code == 401
    assert info.value.error_code == 40101

    after = basic.scrape()

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **LABELS, **labels) - total(before, name, **LABELS, **labels)

    assert grew(FAILURES, reason="missing") == 1
    assert grew(FAILURES, reason="invalid_credentials") == 3  # wrong, unknown user, client
    assert grew(FAILURES, reason="malformed") == 1
    assert grew(FAILURES) == 5
    assert grew(ATTEMPTS) == 6  # the five failures and alice's success

    # Audited with the principal and the reason, never a password; nor in any log line.
    audit = basic.config.audit_log
    assert audit is not None
    lines = wait_until(
        lambda: [
            x
            for x in audit_lines(audit)
            if x["type"] == "authentication" and x["principal"] == "User:mallory"
        ]
    )
    assert lines[0]["success"] is False
    assert lines[0]["reason"] == "invalid_credentials"
    assert lines[0]["listener"] == "schema-registry"
    assert lines[0]["mechanism"] == "BASIC"
    text = audit.read_text()
    assert PASSWORD not in text
    assert WRONG not in text
    messages = [r.getMessage() for r in caplog.records]
    assert any("User:mallory" in m and "invalid credentials" in m for m in messages)
    assert not any(PASSWORD in m or WRONG in m for m in messages)


def _grant(b: BrokerThread, *bindings: tuple[int, str, int, str, str, int, int]) -> None:
    assert b.call(b.broker.authorizer.submit(AlterAcls(creations=tuple(bindings)))).ok


def test_subject_acls_follow_the_topic(tmp_path: Path) -> None:
    with BrokerThread(
        tmp_path / "data",
        schema_registry_port=free_port(),
        schema_registry_authentication="basic",
        authorizer="acl",
        super_users="User:admin",
    ) as b:
        for user in ("alice", "admin", "bob"):
            add_user(b, user, PASSWORD, ("SCRAM-SHA-256",))
        for op in (acls.READ, acls.WRITE):
            _grant(b, (acls.TOPIC, "pay-", acls.PREFIXED, "User:alice", "*", op, acls.ALLOW))
        with client(b, "alice", PASSWORD) as alice, client(b, "admin", PASSWORD) as admin:
            _check_acls(b, alice, admin)


def _check_acls(b: BrokerThread, alice: SchemaRegistryClient, admin: SchemaRegistryClient) -> None:
    mine = alice.register_schema("pay-orders-value", Schema(avro("Order"), "AVRO"))
    with pytest.raises(SchemaRegistryError) as info:
        alice.register_schema("other-value", Schema(avro("Other"), "AVRO"))
    assert info.value.http_status_code == 403
    assert info.value.error_code == 40301
    assert "WRITE" in info.value.error_message
    assert "other" in info.value.error_message
    theirs = admin.register_schema("other-value", Schema(avro("Other"), "AVRO"))
    admin.register_schema("com.example.Record", Schema(avro("Record"), "AVRO"))

    assert alice.get_subjects() == ["pay-orders-value"]
    assert sorted(admin.get_subjects()) == [
        "com.example.Record",
        "other-value",
        "pay-orders-value",
    ]
    assert alice.get_latest_version("pay-orders-value").schema_id == mine
    assert json.loads(alice.get_schema(mine).schema_str)["name"] == "Order"

    def get(path: str, user: str = "alice") -> httpx.Response:
        return httpx.get(url(b) + path, auth=(user, PASSWORD))

    denied = [
        get("/subjects/other-value/versions"),
        get("/subjects/com.example.Record/versions/latest"),
        get(f"/schemas/ids/{theirs}"),
        get("/config"),
        httpx.put(
            url(b) + "/config/pay-orders-value",
            json={"compatibility": "NONE"},
            auth=("alice", PASSWORD),
        ),
        httpx.post(
            url(b) + "/subjects/other-value",
            json={"schema": avro("Other")},
            auth=("alice", PASSWORD),
        ),
    ]
    for response in denied:
        assert response.status_code == 403, response.text
        assert response.json()["error_code"] == 40301
    assert get(f"/schemas/ids/{theirs}/subjects").json() == []
    assert get(f"/schemas/ids/{mine}/versions").json() == [
        {"subject": "pay-orders-value", "version": 1}
    ]
    assert get("/subjects", "bob").json() == []  # no ACLs: nothing listed
    assert get("/subjects/other-value/versions", "admin").json() == [1]
    assert get("/config", "admin").json()["compatibilityLevel"] == "BACKWARD"

    # Each denial counted: alice's register of other-value, and the PUT of a config.
    samples = b.scrape()
    denials = "streambus_authorization_denials_total"
    assert total(samples, denials, operation="WRITE", resource_type="TOPIC") == 1
    assert total(samples, denials, operation="ALTER_CONFIGS", resource_type="TOPIC") == 1


def test_forwarded_write_carries_the_callers_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that does not lead `_schemas` forwards a write with the caller's
    Authorization header; the leader authenticates the same user again."""
    monkeypatch.setattr(forward, "_APPLY_WAIT_S", 0.2)  # the follower here shares no log
    secured = {"schema_registry_authentication": "basic"}
    with (
        BrokerThread(tmp_path / "a", schema_registry_port=free_port(), **secured) as leader,
        BrokerThread(
            tmp_path / "b", schema_registry_port=free_port(), broker_id=2, **secured
        ) as follower,
    ):
        add_user(leader, "alice", PASSWORD, ("SCRAM-SHA-256",))
        add_user(follower, "alice", PASSWORD, ("SCRAM-SHA-256",))
        server = follower.broker._registry_server
        assert server is not None
        forwarder = server._forwarder
        assert forwarder is not None
        port = leader.broker.schema_registry_port
        forwarder._leader = lambda: SchemasLeader(True, 1, "127.0.0.1", port)

        before = leader.scrape()
        with client(follower, "alice", PASSWORD) as sr:
            schema_id = sr.register_schema("fwd-value", Schema(avro("Fwd"), "AVRO"))
        after = leader.scrape()
        # Registered on the leader, which authenticated alice itself
        assert leader.call(_subjects(leader)) == ["fwd-value"]
        assert leader.broker.schemas.schema(schema_id).schema_type == "AVRO"
        grew = total(after, ATTEMPTS, **LABELS) - total(before, ATTEMPTS, **LABELS)
        assert grew == 1
        assert total(after, FAILURES, **LABELS) == 0


async def _subjects(b: BrokerThread) -> list[str]:
    return b.broker.schemas.subjects()
