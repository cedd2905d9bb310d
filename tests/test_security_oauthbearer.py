"""SASL/OAUTHBEARER against a real broker: JWTs the test signs with its own RSA keys,
checked against a JWKS file (and one served over HTTP, with a key rotated in). confluent-kafka
clients produce and consume with an ``oauth_cb``; the token's ``sub`` is the principal the
ACLs see; expired, wrong-audience, foreign-key, ``alg: none`` and HS256 tokens are refused
with SASL_AUTHENTICATION_FAILED after RFC 7628's error challenge, each counted in a scrape."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

from tests.harness import BrokerThread, RawClient, total, wait_until

ISSUER = "https://issuer.test"
AUDIENCE = "streambus"
FAILURES = "streambus_authentication_failures_total"
ATTEMPTS = "streambus_authentication_attempts_total"
MECH = "OAUTHBEARER"
SASL_AUTHENTICATION_FAILED = 58
ERROR_JSON = b'{"status":"invalid_token"}'


def new_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


def sign(key: Any, kid: str, sub: str, *, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def unsigned(kid: str, sub: str) -> str:
    """An ``alg: none`` token (PyJWT will not make one, rightly)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{part(claims)}."


def initial_response(token: str, authzid: str = "") -> bytes:
    return f"n,{'a=' + authzid if authzid else ''},\x01auth=Bearer {token}\x01\x01".encode()


def oauth_conf(port: int, token: Callable[[], str]) -> dict[str, Any]:
    def oauth_cb(_config: str) -> tuple[str, float]:
        value = token()
        claims = jwt.decode(value, options={"verify_signature": False})
        return value, float(claims.get("exp", time.time() + 3600))

    return {
        "bootstrap.servers": f"127.0.0.1:{port}",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": MECH,
        "oauth_cb": oauth_cb,
    }


def raw_login(port: int, token: str, authzid: str = "") -> tuple[Any, RawClient]:
    raw = RawClient(f"127.0.0.1:{port}")
    assert raw.request(SaslHandshakeRequest(mechanism=MECH), 1).error_code == 0
    return raw.request(SaslAuthenticateRequest(auth_bytes=initial_response(token, authzid)), 2), raw


def refused(port: int, token: str) -> str:
    """The failure message of a login with ``token``, checked step by step."""
    reply, raw = raw_login(port, token)
    with raw:
        # RFC 7628 3.2.2: the error JSON as a challenge, the client's ^A, then the failure
        assert (reply.error_code, bytes(reply.auth_bytes)) == (0, ERROR_JSON)
        final = raw.request(SaslAuthenticateRequest(auth_bytes=b"\x01"), 2)
        assert final.error_code == SASL_AUTHENTICATION_FAILED
        assert raw.is_closed_by_peer()
        return str(final.error_message)


@pytest.fixture(scope="module")
def keys() -> dict[str, RSAPrivateKey]:
    return {"k1": new_key(), "foreign": new_key()}


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, RSAPrivateKey]
) -> Iterator[BrokerThread]:
    base = tmp_path_factory.mktemp("oauth")
    jwks = base / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(keys["k1"], "k1")]}))
    with BrokerThread(
        base / "data",
        listeners="SASL_PLAINTEXT://127.0.0.1:0",
        sasl_enabled_mechanisms="OAUTHBEARER",
        sasl_oauthbearer_jwks_endpoint_url=jwks.as_uri(),
        sasl_oauthbearer_expected_audience=AUDIENCE,
        sasl_oauthbearer_expected_issuer=ISSUER,
        authorizer="acl",
        super_users="User:admin",
        connection_failed_authentication_delay_ms=1,
    ) as b:
        yield b


def port_of(b: BrokerThread) -> int:
    return b.broker.listener_port("SASL_PLAINTEXT")


def test_produce_and_consume_as_the_token_subject(
    broker: BrokerThread, keys: dict[str, RSAPrivateKey]
) -> None:
    port = port_of(broker)
    admin = AdminClient(oauth_conf(port, lambda: sign(keys["k1"], "k1", "admin")))
    topic = "oauth-orders"
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    bindings = [
        AclBinding(
            rtype,
            name,
            ResourcePatternType.LITERAL,
            "User:alice",
            "*",
            AclOperation.ALL,
            AclPermissionType.ALLOW,
        )
        for rtype, name in ((ResourceType.TOPIC, topic), (ResourceType.GROUP, "alice-g"))
    ]
    for f in admin.create_acls(bindings).values():
        f.result(30)

    alice = oauth_conf(port, lambda: sign(keys["k1"], "k1", "alice"))
    p = Producer(alice)
    p.produce(topic, b"from-alice")
    assert p.flush(30) == 0

    c = Consumer({**alice, "group.id": "alice-g", "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        msg = wait_until(lambda: c.poll(0.5), timeout=30)
        assert msg.error() is None, msg.error()
        assert msg.value() == b"from-alice"
    finally:
        c.close()

    # another subject, signed by the same issuer: authenticated, but not allowed to write
    errors: list[KafkaError] = []
    p = Producer(oauth_conf(port, lambda: sign(keys["k1"], "k1", "mallory")))
    p.produce(topic, b"from-mallory", on_delivery=lambda err, _msg: errors.append(err))
    p.flush(30)
    assert errors
    assert errors[0] is not None
    assert errors[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    samples = broker.scrape()
    assert total(samples, ATTEMPTS, mechanism=MECH, listener="SASL_PLAINTEXT") >= 3


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("audience", "invalid_audience"),
        ("foreign_key", "invalid_token"),
        ("alg_none", "unsupported_algorithm"),
        ("hs256", "unsupported_algorithm"),
        ("scope_number", "malformed"),
        ("scope_object", "malformed"),
        ("scope_list_of_numbers", "malformed"),
    ],
)
def test_bad_tokens_are_refused_and_counted(
    broker: BrokerThread, keys: dict[str, RSAPrivateKey], case: str, reason: str
) -> None:
    k1 = keys["k1"]
    tokens = {
        "expired": lambda: sign(k1, "k1", "alice", exp=int(time.time()) - 600),
        "audience": lambda: sign(k1, "k1", "alice", aud="someone-else"),
        "foreign_key": lambda: sign(keys["foreign"], "k1", "alice"),
        "alg_none": lambda: unsigned("k1", "alice"),
        "hs256": lambda: sign("a-shared-secret-of-32-bytes-long!", "k1", "alice", alg="HS256"),
        "scope_number": lambda: sign(k1, "k1", "alice", scope=42),
        "scope_object": lambda: sign(k1, "k1", "alice", scope={"read": True}),
        "scope_list_of_numbers": lambda: sign(k1, "k1", "alice", scope=["read", 7]),
    }
    before = total(broker.scrape(), FAILURES, mechanism=MECH, reason=reason)
    message = refused(port_of(broker), tokens[case]())
    assert "invalid_token" in message
    after = broker.scrape()
    assert total(after, FAILURES, mechanism=MECH, reason=reason) == before + 1


def test_librdkafka_client_with_an_expired_token_gets_an_authentication_error(
    broker: BrokerThread, keys: dict[str, RSAPrivateKey]
) -> None:
    errors: list[KafkaError] = []
    expired = sign(keys["k1"], "k1", "alice", exp=int(time.time()) - 600)
    conf = oauth_conf(port_of(broker), lambda: expired)
    # librdkafka refuses to install an already expired token, so hand it a later expiry
    conf["oauth_cb"] = lambda _c: (expired, time.time() + 3600, "alice")
    p = Producer({**conf, "error_cb": errors.append})
    try:
        wait_until(lambda: p.poll(0.2) is not None and errors, timeout=30)
    finally:
        p.flush(0)
    assert errors[0].code() == KafkaError._AUTHENTICATION, errors[0]
    assert "invalid_token" in errors[0].str()


def test_malformed_response_and_authzid(
    broker: BrokerThread, keys: dict[str, RSAPrivateKey]
) -> None:
    port = port_of(broker)
    with RawClient(f"127.0.0.1:{port}") as raw:
        assert raw.request(SaslHandshakeRequest(mechanism=MECH), 1).error_code == 0
        reply = raw.request(SaslAuthenticateRequest(auth_bytes=b"not gs2 at all"), 2)
        assert reply.error_code == SASL_AUTHENTICATION_FAILED
        assert raw.is_closed_by_peer()
    # an authzid naming someone else than the token's subject
    reply, raw = raw_login(port, sign(keys["k1"], "k1", "alice"), authzid="admin")
    with raw:
        assert (reply.error_code, bytes(reply.auth_bytes)) == (0, ERROR_JSON)
    reply, raw = raw_login(port, sign(keys["k1"], "k1", "alice"), authzid="alice")
    with raw:
        assert reply.error_code == 0
        assert bytes(reply.auth_bytes) == b""


@pytest.mark.parametrize("scope", ["read write", ["read", "write"], ""])
def test_a_scope_claim_string_or_list_is_accepted(
    broker: BrokerThread, keys: dict[str, RSAPrivateKey], scope: Any
) -> None:
    reply, raw = raw_login(port_of(broker), sign(keys["k1"], "k1", "alice", scope=scope))
    with raw:
        assert (reply.error_code, bytes(reply.auth_bytes)) == (0, b"")


def test_parse_scopes_as_kafka_reads_the_claim() -> None:
    from streambus.security.oauthbearer import TokenRejectedError, parse_scopes

    assert parse_scopes(None) == ()
    assert parse_scopes(" read  write ") == ("read", "write")
    assert parse_scopes(["read", "write"]) == ("read", "write")
    for bad in (42, 1.5, True, {"read": 1}, ["read", None], ["read", " "]):
        with pytest.raises(TokenRejectedError) as refused_:
            parse_scopes(bad)
        assert refused_.value.reason == "malformed"


def test_token_exp_bounds_the_session(broker: BrokerThread, keys: dict[str, RSAPrivateKey]) -> None:
    port = port_of(broker)
    reply, raw = raw_login(port, sign(keys["k1"], "k1", "alice", exp=int(time.time()) + 120))
    with raw:
        assert reply.error_code == 0
        assert 100_000 < reply.session_lifetime_ms <= 120_000
    # a token that ends in a second: the session ends with it, and the next request closes
    reply, raw = raw_login(port, sign(keys["k1"], "k1", "alice", exp=int(time.time()) + 2))
    with raw:
        assert reply.error_code == 0
        assert 0 < reply.session_lifetime_ms <= 2000
        deadline = time.monotonic() + reply.session_lifetime_ms / 1000
        wait_until(lambda: time.monotonic() > deadline, timeout=10)
        meta = MetadataRequest(topics=[], allow_auto_topic_creation=False)
        with pytest.raises((ConnectionError, OSError)):
            raw.request(meta, 9)


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    document: dict[str, Any] = {"keys": []}
    gets: list[str] = []

    def do_GET(self) -> None:
        body = json.dumps(type(self).document).encode()
        type(self).gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_jwks_over_http_with_a_rotated_key(tmp_path: Path, keys: dict[str, RSAPrivateKey]) -> None:
    handler = type("Handler", (_JwksHandler,), {"document": {"keys": [jwk(keys["k1"], "k1")]}})
    handler.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    try:
        with BrokerThread(
            tmp_path / "data",
            listeners="SASL_PLAINTEXT://127.0.0.1:0",
            sasl_enabled_mechanisms="OAUTHBEARER",
            sasl_oauthbearer_jwks_endpoint_url=url,
            sasl_oauthbearer_jwks_endpoint_retry_backoff_ms=0,
            connection_failed_authentication_delay_ms=1,
        ) as b:
            port = port_of(b)
            # fetched when the broker started, before any login asked for a key
            wait_until(lambda: handler.gets == ["/.well-known/jwks.json"], timeout=30)
            reply, raw = raw_login(port, sign(keys["k1"], "k1", "alice"))
            raw.close()
            assert reply.error_code == 0
            assert handler.gets == ["/.well-known/jwks.json"]
            k2 = new_key()
            # not yet published: refused (after one refetch that finds nothing new)
            assert "invalid_token" in refused(port, sign(k2, "k2", "alice"))
            assert len(handler.gets) == 2
            handler.document = {"keys": [jwk(keys["k1"], "k1"), jwk(k2, "k2")]}
            p = Producer(oauth_conf(port, lambda: sign(k2, "k2", "alice")))
            p.produce("rotated", b"signed-by-k2")
            assert p.flush(30) == 0
            assert len(handler.gets) == 3
            samples = b.scrape()
            assert total(samples, FAILURES, mechanism=MECH, reason="unknown_key") == 1
    finally:
        server.shutdown()
        server.server_close()


class _FailingFirstHandler(_JwksHandler):
    def do_GET(self) -> None:
        if not type(self).gets:
            type(self).gets.append(self.path)
            self.send_error(503)
            return
        super().do_GET()


def test_a_failed_first_jwks_fetch_warns_once_and_is_retried_at_login(
    tmp_path: Path, keys: dict[str, RSAPrivateKey], caplog: pytest.LogCaptureFixture
) -> None:
    handler = type(
        "Handler", (_FailingFirstHandler,), {"document": {"keys": [jwk(keys["k1"], "k1")]}}
    )
    handler.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "JWKS" in r.getMessage()
        ]

    try:
        with (
            caplog.at_level(logging.WARNING, logger="streambus.security"),
            BrokerThread(
                tmp_path / "data",
                listeners="SASL_PLAINTEXT://127.0.0.1:0",
                sasl_enabled_mechanisms="OAUTHBEARER",
                sasl_oauthbearer_jwks_endpoint_url=url,
                connection_failed_authentication_delay_ms=1,
            ) as b,
        ):
            wait_until(warnings, timeout=30)
            assert len(handler.gets) == 1
            reply, raw = raw_login(port_of(b), sign(keys["k1"], "k1", "alice"))
            raw.close()
            assert reply.error_code == 0
            assert len(handler.gets) == 2
            assert len(warnings()) == 1, warnings()
            assert "503" in warnings()[0]
    finally:
        server.shutdown()
        server.server_close()


def test_https_jwks_is_verified_against_the_configured_ca(
    tmp_path: Path, keys: dict[str, RSAPrivateKey]
) -> None:
    import ssl
    import urllib.error

    from streambus.security.oauthbearer import _load, parse_jwks
    from tests.security_certs import make_certs

    certs = make_certs(tmp_path / "certs")
    handler = type("Handler", (_JwksHandler,), {"document": {"keys": [jwk(keys["k1"], "k1")]}})
    handler.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/jwks.json"
    try:
        assert set(parse_jwks(_load(url, certs.ca))) == {"k1"}
        # the system's CAs do not vouch for the test CA
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _load(url)
    finally:
        server.shutdown()
        server.server_close()


def test_config_refuses_oauthbearer_without_jwks(tmp_path: Path) -> None:
    from streambus.config import BrokerConfig
    from streambus.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match=r"jwks\.endpoint\.url"):
        BrokerConfig.load({"sasl_enabled_mechanisms": "OAUTHBEARER"}, env={})
    with pytest.raises(InvalidConfigError, match="scheme"):
        BrokerConfig.load(
            {
                "sasl_enabled_mechanisms": "OAUTHBEARER",
                "sasl_oauthbearer_jwks_endpoint_url": "ftp://x/jwks",
            },
            env={},
        )
    config = BrokerConfig.load(
        {"data_dir": tmp_path},
        env={
            "STREAMBUS_SASL_ENABLED_MECHANISMS": "SCRAM-SHA-256,OAUTHBEARER",
            "STREAMBUS_SASL_OAUTHBEARER_JWKS_ENDPOINT_URL": "https://idp.example/jwks",
            "STREAMBUS_SASL_OAUTHBEARER_CLOCK_SKEW_SECONDS": "5",
        },
    )
    assert config.sasl_oauthbearer_clock_skew_seconds == 5
    with pytest.raises(InvalidConfigError, match=r"inter\.broker"):
        BrokerConfig.load(
            {
                "sasl_enabled_mechanisms": "OAUTHBEARER",
                "sasl_oauthbearer_jwks_endpoint_url": "file:///tmp/jwks.json",
                "sasl_mechanism_inter_broker_protocol": "OAUTHBEARER",
            },
            env={},
        )
