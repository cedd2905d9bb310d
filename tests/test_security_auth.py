"""SASL and TLS from the broker's side, with raw frames where a test needs exact bytes:
failures answered with Kafka's codes and counted, connections that skip authentication
closed, a flood of failed logins beside a served client, TLS refusals, SASL handshake v0,
re-authentication, and credentials managed by admin clients and the CLI."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest
from scramp import ScramClient

from streambus.cluster.scram_credentials import record_for
from streambus.security.credentials import make_credential
from streambus.security.tls import principal_from_cert
from tests.harness import ROOT, BrokerThread, RawClient, total, wait_until
from tests.security_certs import Certs, make_certs

USER, PASSWORD = "alice", "correct-horse-battery"
WRONG = "wrong-password-XYZZY"
FAILURES = "streambus_authentication_failures_total"
ATTEMPTS = "streambus_authentication_attempts_total"
LISTENERS = "PLAINTEXT://127.0.0.1:0,SASL_PLAINTEXT://127.0.0.1:0,SASL_SSL://127.0.0.1:0"


def add_user(b: BrokerThread, user: str, password: str) -> None:
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        record = record_for(user, mechanism, make_credential(mechanism, password))
        assert b.call(b.broker.credentials.submit(record)).ok


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path_factory.mktemp("auth") / "data",
        listeners=LISTENERS,
        ssl_certfile=certs.server_cert,
        ssl_keyfile=certs.server_key,
        connection_failed_authentication_delay_ms=1,
    ) as b:
        add_user(b, USER, PASSWORD)
        yield b


def address(b: BrokerThread, listener: str) -> str:
    return f"127.0.0.1:{b.broker.listener_port(listener)}"


def handshake(raw: RawClient, mechanism: str, version: int = 1) -> Any:
    return raw.request(SaslHandshakeRequest(mechanism=mechanism), version)


def authenticate(raw: RawClient, token: bytes, version: int = 2) -> Any:
    return raw.request(SaslAuthenticateRequest(auth_bytes=token), version)


def plain_login(raw: RawClient, password: str) -> Any:
    assert handshake(raw, "PLAIN").error_code == 0
    return authenticate(raw, b"\0" + USER.encode() + b"\0" + password.encode())


def metadata(raw: RawClient) -> Any:
    return raw.request(MetadataRequest(topics=[], allow_auto_topic_creation=False), 9)


def test_plain_login_then_metadata_advertises_this_listener(broker: BrokerThread) -> None:
    with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
        assert raw.request(ApiVersionsRequest(), 0).error_code == 0  # allowed before auth
        reply = plain_login(raw, PASSWORD)
        assert (reply.error_code, reply.error_message) == (0, None)
        brokers = metadata(raw).brokers
        assert [(x.host, x.port) for x in brokers] == [
            ("127.0.0.1", broker.broker.listener_port("SASL_PLAINTEXT"))
        ]


def test_wrong_password_gets_sasl_authentication_failed_counted_once(
    broker: BrokerThread,
) -> None:
    labels = {"mechanism": "PLAIN", "listener": "SASL_PLAINTEXT"}
    before = total(broker.scrape(), FAILURES, reason="invalid_credentials", **labels)
    attempts = total(broker.scrape(), ATTEMPTS, **labels)
    with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
        reply = plain_login(raw, WRONG)
        assert reply.error_code == 58  # SASL_AUTHENTICATION_FAILED
        assert "invalid credentials" in reply.error_message
        assert raw.is_closed_by_peer()
    samples = broker.scrape()
    assert total(samples, FAILURES, reason="invalid_credentials", **labels) == before + 1
    assert total(samples, ATTEMPTS, **labels) == attempts + 1


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_wrong_password_and_right_password(broker: BrokerThread, mechanism: str) -> None:
    labels = {"mechanism": mechanism, "listener": "SASL_PLAINTEXT"}
    before = total(broker.scrape(), FAILURES, **labels)
    for password, ok in ((WRONG, False), (PASSWORD, True)):
        with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
            assert handshake(raw, mechanism).error_code == 0
            client = ScramClient([mechanism], USER, password)
            first = authenticate(raw, client.get_client_first().encode())
            assert first.error_code == 0
            client.set_server_first(bytes(first.auth_bytes).decode())
            final = authenticate(raw, client.get_client_final().encode())
            if ok:
                assert final.error_code == 0
                client.set_server_final(bytes(final.auth_bytes).decode())  # server proven
                assert metadata(raw).brokers
            else:
                assert final.error_code == 58
                assert raw.is_closed_by_peer()
    assert total(broker.scrape(), FAILURES, **labels) == before + 1


def test_unknown_mechanism_gets_unsupported_sasl_mechanism(broker: BrokerThread) -> None:
    with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
        reply = handshake(raw, "GSSAPI")
        assert reply.error_code == 33  # UNSUPPORTED_SASL_MECHANISM
        assert reply.mechanisms == ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
        assert raw.is_closed_by_peer()
    assert total(broker.scrape(), FAILURES, reason="unsupported_mechanism") >= 1


def test_skipping_authentication_is_disconnected(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
        request = MetadataRequest(topics=[], allow_auto_topic_creation=False)
        request.with_header(correlation_id=1, client_id="skipper")
        raw.sock.sendall(bytes(request.encode(version=9, header=True, framed=True)))
        assert raw.is_closed_by_peer()
    assert any("before SASL authentication" in r.getMessage() for r in caplog.records)
    # the plaintext listener still serves clients without authentication
    with RawClient(address(broker, "PLAINTEXT")) as raw:
        assert metadata(raw).brokers


def test_sasl_handshake_v0_then_bare_tokens(broker: BrokerThread) -> None:
    with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
        assert handshake(raw, "PLAIN", version=0).error_code == 0
        token = b"\0" + USER.encode() + b"\0" + PASSWORD.encode()
        raw.sock.sendall(len(token).to_bytes(4, "big") + token)
        assert raw.read_frame() == b""  # PLAIN's empty server token, bare
        assert metadata(raw).brokers


def test_a_thousand_failed_logins_while_a_client_is_served(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    from kafka import KafkaProducer

    caplog.set_level(logging.DEBUG)
    labels = {"mechanism": "PLAIN", "listener": "SASL_PLAINTEXT", "reason": "invalid_credentials"}
    before = total(broker.scrape(), FAILURES, **labels)
    producer = KafkaProducer(
        bootstrap_servers=address(broker, "SASL_PLAINTEXT"),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username=USER,
        sasl_plain_password=PASSWORD,
    )
    producer.send("flood", b"warm-up").get(15)
    flooding = threading.Event()
    flooding.set()
    acked: list[int] = []

    def keep_producing() -> None:
        while flooding.is_set():
            acked.append(producer.send("flood", b"served").get(15).offset)

    worker = threading.Thread(target=keep_producing)
    worker.start()
    try:
        for _ in range(1000):
            with RawClient(address(broker, "SASL_PLAINTEXT")) as raw:
                assert plain_login(raw, WRONG).error_code == 58
        served_during_flood = len(acked)
    finally:
        flooding.clear()
        worker.join(30)
        producer.close()
    assert served_during_flood > 0
    assert total(broker.scrape(), FAILURES, **labels) == before + 1000
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if WRONG in line or PASSWORD in line]
    warnings = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "authentication" in r.getMessage()
    ]
    assert 0 < len(warnings) < 100, "failed logins are logged, rate-limited"


def test_plaintext_to_a_tls_port_closes_that_connection_only(
    broker: BrokerThread, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    context = ssl.create_default_context(cafile=str(certs.ca))
    port = broker.broker.listener_port("SASL_SSL")
    with (
        socket.create_connection(("127.0.0.1", port)) as kept,
        context.wrap_socket(kept, server_hostname="localhost") as tls,  # open before and after
    ):
        with RawClient(address(broker, "SASL_SSL")) as raw:
            request = ApiVersionsRequest()
            request.with_header(correlation_id=1, client_id="plaintext")
            raw.sock.sendall(bytes(request.encode(version=0, header=True, framed=True)))
            assert raw.is_closed_by_peer()
            peer = f"127.0.0.1:{raw.sock.getsockname()[1]}"

        def warned() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and peer in r.getMessage()
            ]

        assert len(wait_until(warned)) == 1
        assert "TLS handshake failed" in warned()[0]
        request = ApiVersionsRequest()
        request.with_header(correlation_id=7, client_id="tls")
        tls.sendall(bytes(request.encode(version=0, header=True, framed=True)))
        assert len(tls.recv(4)) == 4  # the TLS connection is still served


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path_factory.mktemp("mtls") / "data",
        listeners="SSL://127.0.0.1:0",
        ssl_certfile=certs.server_cert,
        ssl_keyfile=certs.server_key,
        ssl_cafile=certs.ca,
        ssl_client_auth="required",
    ) as b:
        yield b


def _api_versions_over_tls(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        request = ApiVersionsRequest()
        request.with_header(correlation_id=1, client_id="tls")
        tls.sendall(bytes(request.encode(version=0, header=True, framed=True)))
        return tls.recv(4)


def test_tls_client_without_a_certificate_is_refused_when_required(
    mtls: BrokerThread, certs: Certs
) -> None:
    port = mtls.broker.listener_port("SSL")
    bare = ssl.create_default_context(cafile=str(certs.ca))
    try:
        reply = _api_versions_over_tls(port, bare)
    except (ssl.SSLError, ConnectionError):
        reply = b""  # TLS 1.3: the refusal arrives as an alert at the first read
    assert reply == b""
    with_cert = ssl.create_default_context(cafile=str(certs.ca))
    with_cert.load_cert_chain(certs.client_cert, certs.client_key)
    assert len(_api_versions_over_tls(port, with_cert)) == 4
    assert total(mtls.scrape(), ATTEMPTS, mechanism="SSL", listener="SSL") >= 1


def test_principal_from_the_certificate_subject() -> None:
    cert = {"subject": ((("organizationName", "StreamBus Tests"),), (("commonName", "alice"),))}
    assert principal_from_cert(cert) == "User:CN=alice,O=StreamBus Tests"
    assert principal_from_cert(None) == "User:ANONYMOUS"
    assert principal_from_cert({"subject": ((("commonName", "a,b"),),)}) == "User:CN=a\\,b"


def test_session_lifetime_and_expiry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streambus")
    with BrokerThread(
        tmp_path / "data",
        listeners="SASL_PLAINTEXT://127.0.0.1:0",
        connections_max_reauth_ms=300,
    ) as b:
        add_user(b, USER, PASSWORD)
        with RawClient(address(b, "SASL_PLAINTEXT")) as raw:
            reply = plain_login(raw, PASSWORD)
            assert (reply.error_code, reply.session_lifetime_ms) == (0, 300)

            def closed() -> bool:
                try:
                    metadata(raw)
                except (ConnectionError, OSError):
                    return True
                return False

            assert wait_until(closed, timeout=10)
    assert [r for r in caplog.records if "SASL session expired" in r.getMessage()]


def _users(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streambus", "users", *args],
        input=stdin,
        text=True,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_credentials_survive_restart_and_the_users_cli(tmp_path: Path) -> None:
    from kafka.admin import KafkaAdminClient, UserScramCredentialUpsertion

    data = tmp_path / "data"
    made = _users("add", "bob", "--data-dir", str(data), stdin="bob-password\n")
    assert made.returncode == 0, made.stderr
    listeners = "PLAINTEXT://127.0.0.1:0,SASL_PLAINTEXT://127.0.0.1:0"
    with BrokerThread(data, listeners=listeners) as b:
        refused = _users("add", "eve", "--data-dir", str(data), "--password", "x")
        assert refused.returncode == 1
        assert "locked" in refused.stderr
        admin = KafkaAdminClient(bootstrap_servers=address(b, "PLAINTEXT"))
        try:
            assert admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion("carol", "SCRAM-SHA-512", "carol-password")]
            ) == {"carol": None}
        finally:
            admin.close()
    with BrokerThread(data, listeners=listeners) as b:
        for user, password, mechanism in (
            ("bob", "bob-password", "SCRAM-SHA-256"),
            ("carol", "carol-password", "SCRAM-SHA-512"),
            ("bob", "bob-password", "PLAIN"),
        ):
            with RawClient(address(b, "SASL_PLAINTEXT")) as raw:
                assert handshake(raw, mechanism).error_code == 0
                if mechanism == "PLAIN":
                    token = f"\0{user}\0{password}".encode()
                    assert authenticate(raw, token).error_code == 0
                    continue
                client = ScramClient([mechanism], user, password)
                first = authenticate(raw, client.get_client_first().encode())
                client.set_server_first(bytes(first.auth_bytes).decode())
                assert authenticate(raw, client.get_client_final().encode()).error_code == 0
        listed = _users("list", "--bootstrap", address(b, "PLAINTEXT"))
        assert listed.returncode == 0, listed.stderr
        assert sorted(listed.stdout.split("\n")[:-1]) == [
            "bob\tSCRAM-SHA-256\titerations=4096",
            "bob\tSCRAM-SHA-512\titerations=4096",
            "carol\tSCRAM-SHA-512\titerations=4096",
        ]
        deleted = _users("delete", "bob", "--bootstrap", address(b, "PLAINTEXT"))
        assert deleted.returncode == 0, deleted.stderr
        assert "bob" not in b.broker.credentials.users()


def test_admin_errors_are_kafkas(broker: BrokerThread) -> None:
    from kafka.admin import (
        KafkaAdminClient,
        UserScramCredentialDeletion,
        UserScramCredentialUpsertion,
    )

    admin = KafkaAdminClient(bootstrap_servers=address(broker, "PLAINTEXT"))
    try:
        errors = admin.alter_user_scram_credentials(
            [
                UserScramCredentialUpsertion("weak", "SCRAM-SHA-256", "pw", iterations=1000),
                UserScramCredentialDeletion("nobody", "SCRAM-SHA-512"),
            ]
        )
        assert errors == {"weak": "Too few iterations", "nobody": pytest.approx(errors["nobody"])}
        assert "does not exist" in errors["nobody"]
        described = admin.describe_user_scram_credentials(["nobody", USER])
        assert "does not exist" in described["nobody"]["error"]
        assert [ci["iterations"] for ci in described[USER]["credential_infos"]] == [4096, 4096]
    finally:
        admin.close()


def test_confluent_kafka_admin_alters_scram_credentials(broker: BrokerThread) -> None:
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient({"bootstrap.servers": address(broker, "PLAINTEXT")})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    futures = admin.alter_user_scram_credentials(
        [UserScramCredentialUpsertion("dave", info, b"dave-password")]
    )
    for future in futures.values():
        future.result(15)
    described = admin.describe_user_scram_credentials(["dave"])
    infos = described["dave"].result(15).scram_credential_infos
    assert [(i.mechanism, i.iterations) for i in infos] == [(ScramMechanism.SCRAM_SHA_512, 8192)]


def test_librdkafka_reauthenticates_before_its_session_expires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """connections.max.reauth.ms with a real client: librdkafka re-authenticates on the
    same connection before the lifetime it was told, and keeps being served."""
    import time

    from confluent_kafka import Producer

    caplog.set_level(logging.INFO, logger="streambus")
    with BrokerThread(
        tmp_path / "data",
        listeners="SASL_PLAINTEXT://127.0.0.1:0",
        connections_max_reauth_ms=1000,
    ) as b:
        add_user(b, USER, PASSWORD)
        labels = {"mechanism": "SCRAM-SHA-256", "listener": "SASL_PLAINTEXT"}
        producer = Producer(
            {
                "bootstrap.servers": address(b, "SASL_PLAINTEXT"),
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "SCRAM-SHA-256",
                "sasl.username": USER,
                "sasl.password": PASSWORD,
            }
        )
        errors: list[Any] = []
        delivered = 0
        deadline = time.monotonic() + 30
        # produce until the client has authenticated three times (twice more than at start)
        while total(b.scrape(), ATTEMPTS, **labels) < 4 and time.monotonic() < deadline:
            producer.produce("reauth", b"x", on_delivery=lambda e, _m: e and errors.append(e))
            delivered += 1
            assert producer.flush(10) == 0
        assert total(b.scrape(), ATTEMPTS, **labels) >= 4
        assert total(b.scrape(), FAILURES, **labels) == 0
        assert not errors
        assert delivered > 1
        # re-authenticated on its connections: none was closed for an expired session
        assert not [r for r in caplog.records if "expired" in r.getMessage()]


def test_renewed_certificates_are_served_without_a_restart(tmp_path: Path) -> None:
    import shutil

    first = make_certs(tmp_path / "first")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.server_cert, live / "server.pem")
    shutil.copy(first.server_key, live / "server.key")
    with BrokerThread(
        tmp_path / "data",
        listeners="SSL://127.0.0.1:0",
        ssl_certfile=live / "server.pem",
        ssl_keyfile=live / "server.key",
    ) as b:
        port = b.broker.listener_port("SSL")
        assert len(_api_versions_over_tls(port, ssl.create_default_context(cafile=str(first.ca))))
        renewed = make_certs(tmp_path / "renewed")  # another CA: only its clients trust it
        shutil.copy(renewed.server_key, live / "server.key.new")
        shutil.copy(renewed.server_cert, live / "server.pem.new")
        (live / "server.key.new").replace(live / "server.key")
        (live / "server.pem.new").replace(live / "server.pem")
        trusting = ssl.create_default_context(cafile=str(renewed.ca))

        def served() -> bool:
            try:
                return len(_api_versions_over_tls(port, trusting)) == 4
            except (ssl.SSLError, ConnectionError):
                return False

        assert wait_until(served, timeout=20)
