"""Unmodified Kafka clients over SASL_SSL: SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, with
confluent-kafka, kafka-python, aiokafka and kcat producing, consuming and joining groups."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import BrokerThread, total
from tests.security_certs import Certs, make_certs

MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
USER, PASSWORD = "alice", "alice-secret-42"
N = 20
KCAT = shutil.which("kcat")
LISTENERS = "PLAINTEXT://127.0.0.1:0,SASL_SSL://127.0.0.1:0"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerThread, Certs]]:
    from kafka.admin import KafkaAdminClient, UserScramCredentialUpsertion

    root = tmp_path_factory.mktemp("secured")
    certs = make_certs(root / "certs")
    with BrokerThread(
        root / "data",
        listeners=LISTENERS,
        ssl_certfile=certs.server_cert,
        ssl_keyfile=certs.server_key,
        group_initial_rebalance_delay_ms=0,
    ) as b:
        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{b.broker.listener_port('PLAINTEXT')}"
        )
        try:
            errors = admin.alter_user_scram_credentials(
                [
                    UserScramCredentialUpsertion(USER, "SCRAM-SHA-256", PASSWORD),
                    UserScramCredentialUpsertion(USER, "SCRAM-SHA-512", PASSWORD, iterations=8192),
                ]
            )
        finally:
            admin.close()
        assert errors == {USER: None}
        yield b, certs


def sasl_ssl(b: BrokerThread) -> str:
    return f"127.0.0.1:{b.broker.listener_port('SASL_SSL')}"


def _values(tag: str) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(N)]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_confluent_kafka(secured: tuple[BrokerThread, Certs], mechanism: str) -> None:
    from confluent_kafka import Consumer, Producer

    b, certs = secured
    before = total(b.scrape(), "streambus_authentication_attempts_total", mechanism=mechanism)
    common = {
        "bootstrap.servers": sasl_ssl(b),
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": mechanism,
        "sasl.username": USER,
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(certs.ca),
    }
    topic = f"ck-{mechanism.lower()}"
    producer = Producer({**common, "linger.ms": 5})
    errors: list[Any] = []
    for v in _values(topic):
        producer.produce(topic, v, on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(30) == 0
    assert not errors
    consumer = Consumer({**common, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list[bytes] = []
    for _ in range(60):
        if len(got) >= N:
            break
        for m in consumer.consume(100, 0.5):
            assert m.error() is None, m.error()
            got.append(m.value())
    assert sorted(got) == sorted(_values(topic))
    assert consumer.assignment(), "joined the group and was given the partition"
    consumer.close()
    after = total(b.scrape(), "streambus_authentication_attempts_total", mechanism=mechanism)
    assert after > before


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_kafka_python(secured: tuple[BrokerThread, Certs], mechanism: str) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    b, certs = secured
    common: dict[str, Any] = {
        "bootstrap_servers": sasl_ssl(b),
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": USER,
        "sasl_plain_password": PASSWORD,
        "ssl_cafile": str(certs.ca),
    }
    topic = f"kp-{mechanism.lower()}"
    producer = KafkaProducer(**common, linger_ms=5)
    futures = [producer.send(topic, v) for v in _values(topic)]
    producer.flush(30)
    assert all(f.get(10).offset >= 0 for f in futures)
    producer.close()
    consumer = KafkaConsumer(topic, **common, group_id=f"g-{topic}", auto_offset_reset="earliest")
    got: list[bytes] = []
    for _ in range(60):
        if len(got) >= N:
            break
        for records in consumer.poll(500).values():
            got.extend(r.value for r in records)
    assert sorted(got) == sorted(_values(topic))
    assert consumer.assignment()
    consumer.close()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_aiokafka(secured: tuple[BrokerThread, Certs], mechanism: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    b, certs = secured
    topic = f"ak-{mechanism.lower()}"

    async def run() -> list[bytes]:
        context = ssl.create_default_context(cafile=str(certs.ca))
        common: dict[str, Any] = {
            "bootstrap_servers": sasl_ssl(b),
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": mechanism,
            "sasl_plain_username": USER,
            "sasl_plain_password": PASSWORD,
            "ssl_context": context,
        }
        producer = AIOKafkaProducer(**common)
        await producer.start()
        try:
            for v in _values(topic):
                await producer.send(topic, v)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, **common, group_id=f"g-{topic}", auto_offset_reset="earliest"
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            while len(got) < N:
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 30)
                for records in batch.values():
                    got.extend(r.value for r in records if r.value is not None)
            assert consumer.assignment()
        finally:
            await consumer.stop()
        return got

    assert sorted(asyncio.run(run())) == sorted(_values(topic))


@pytest.mark.skipif(KCAT is None, reason="kcat is installed by `make install`")
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_kcat(secured: tuple[BrokerThread, Certs], mechanism: str) -> None:
    assert KCAT is not None
    b, certs = secured
    topic = f"kc-{mechanism.lower()}"
    options = [
        "-b",
        sasl_ssl(b),
        "-X",
        "security.protocol=SASL_SSL",
        "-X",
        f"sasl.mechanism={mechanism}",
        "-X",
        f"sasl.username={USER}",
        "-X",
        f"sasl.password={PASSWORD}",
        "-X",
        f"ssl.ca.location={certs.ca}",
    ]
    lines = [v.decode() for v in _values(topic)]
    produce = subprocess.run(
        [KCAT, *options, "-P", "-t", topic],
        input="\n".join(lines) + "\n",
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert produce.returncode == 0, produce.stderr
    # -G: a balanced consumer group member (JoinGroup/SyncGroup over SASL_SSL)
    consume = subprocess.run(
        [
            KCAT,
            *options,
            "-G",
            f"g-{topic}-{uuid.uuid4().hex[:6]}",
            "-o",
            "beginning",
            "-e",
            "-q",
            "-X",
            "auto.offset.reset=earliest",
            topic,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert consume.returncode == 0, consume.stderr
    assert sorted(consume.stdout.split()) == sorted(lines)


def test_metadata_advertises_the_listener_connected_on(
    secured: tuple[BrokerThread, Certs],
) -> None:
    from kafka import KafkaAdminClient

    b, certs = secured
    plain = b.broker.listener_port("PLAINTEXT")
    admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{plain}")
    try:
        brokers = admin.describe_cluster()["brokers"]
    finally:
        admin.close()
    assert [(x["host"], x["port"]) for x in brokers] == [("127.0.0.1", plain)]
    admin = KafkaAdminClient(
        bootstrap_servers=sasl_ssl(b),
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_plain_username=USER,
        sasl_plain_password=PASSWORD,
        ssl_cafile=str(certs.ca),
    )
    try:
        brokers = admin.describe_cluster()["brokers"]
    finally:
        admin.close()
    assert [(x["host"], x["port"]) for x in brokers] == [
        ("127.0.0.1", b.broker.listener_port("SASL_SSL"))
    ]
