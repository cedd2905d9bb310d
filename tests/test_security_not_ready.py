"""Requests that meet a broker whose ACLs and SCRAM credentials are not loaded yet (a
cluster member still catching up with its Raft log) wait for them, bounded, and past the
bound get an answer a client retries, never a traceback: the schema registry's REST API
answers 503 with Confluent's 50002 and ``Retry-After``; DescribeUserScramCredentials and
AlterUserScramCredentials on a broker without the authorizer answer REQUEST_TIMED_OUT.

The window is opened on a real broker through its own ``SecurityState`` (``unload``, as
a stop does), and closed with ``mark_loaded``, as the catch-up does."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kafka.protocol.admin import (
    AlterUserScramCredentialsRequest,
    DescribeUserScramCredentialsRequest,
)

from streambus.protocol import scram_admin
from streambus.schemas import auth
from tests.harness import BrokerThread, RawClient, free_port, wait_until

TIMED_OUT = 7  # REQUEST_TIMED_OUT


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data",
        schema_registry_port=free_port(),
        authorizer="acl",
        allow_everyone_if_no_acl_found=True,
    ) as b:
        yield b


def unload(b: BrokerThread) -> None:
    b.run(b.broker.security.unload)


def waiting(b: BrokerThread) -> int:
    return len(b.broker.security._waiters)


def url(b: BrokerThread) -> str:
    return f"http://127.0.0.1:{b.broker.schema_registry_port}"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_rest_answers_503_with_retry_after_until_loaded(
    acl_broker: BrokerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = acl_broker
    assert httpx.get(url(b) + "/subjects").status_code == 200
    monkeypatch.setattr(auth, "NOT_READY_WAIT_S", 0.3)
    unload(b)
    r = httpx.get(url(b) + "/subjects", timeout=10)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1"
    body = r.json()
    assert body["error_code"] == 50002
    assert "not loaded its ACLs and credentials" in body["message"]
    assert "not loaded its ACLs and credentials yet" in caplog.text  # one warning line
    no_tracebacks(caplog)

    b.run(b.broker.security.mark_loaded)
    assert httpx.get(url(b) + "/subjects").status_code == 200


def test_rest_request_waits_and_is_served_once_loaded(
    acl_broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    b = acl_broker
    unload(b)
    answers: list[httpx.Response] = []
    ask = threading.Thread(
        target=lambda: answers.append(httpx.get(url(b) + "/subjects", timeout=30))
    )
    ask.start()
    wait_until(lambda: b.run(waiting, b) == 1)  # held, not answered
    assert not answers
    b.run(b.broker.security.mark_loaded)
    ask.join(30)
    assert [a.status_code for a in answers] == [200]
    no_tracebacks(caplog)


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[BrokerThread]:
    """No authorizer: the server holds nothing, the SCRAM admin APIs wait themselves."""
    with BrokerThread(tmp_path / "data") as b:
        yield b


def describe() -> DescribeUserScramCredentialsRequest:
    return DescribeUserScramCredentialsRequest(users=None)


def delete_alice() -> AlterUserScramCredentialsRequest:
    A = AlterUserScramCredentialsRequest
    return A(deletions=[A.ScramCredentialDeletion(name="alice", mechanism=1)], upsertions=[])


def test_scram_admin_apis_answer_request_timed_out_until_loaded(
    plain_broker: BrokerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = plain_broker
    monkeypatch.setattr(scram_admin, "WAIT_S", 0.3)
    unload(b)
    with RawClient(b.bootstrap) as client:
        described = client.request(describe(), 0)
        assert described.error_code == TIMED_OUT, described
        assert "not loaded its SCRAM credentials" in described.error_message
        altered = client.request(delete_alice(), 0)
        assert [(r.user, r.error_code) for r in altered.results] == [("alice", TIMED_OUT)]
    no_tracebacks(caplog)

    b.run(b.broker.security.mark_loaded)
    with RawClient(b.bootstrap) as client:
        assert client.request(describe(), 0).error_code == 0
        altered = client.request(delete_alice(), 0)
        assert [r.error_code for r in altered.results] == [91]  # RESOURCE_NOT_FOUND


def test_scram_admin_request_waits_and_is_served_once_loaded(plain_broker: BrokerThread) -> None:
    b = plain_broker
    unload(b)
    with RawClient(b.bootstrap, timeout=30) as client:
        client._correlation += 1
        request = describe()
        request.with_header(correlation_id=client._correlation, client_id="raw-test")
        client.sock.sendall(bytes(request.encode(version=0, header=True, framed=True)))
        wait_until(lambda: b.run(waiting, b) == 1)  # held, not answered
        b.run(b.broker.security.mark_loaded)
        answer = client.read_response(DescribeUserScramCredentialsRequest, 0)
    assert answer.error_code == 0
