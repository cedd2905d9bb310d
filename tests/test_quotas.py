"""Client quotas through real sockets: AlterClientQuotas/DescribeClientQuotas as raw frames
(confluent-kafka and kafka-python have no client-quota admin calls), a confluent-kafka
producer held near its byte rate while another client id is not, the fetch quota's mute,
the throttle histogram through a real scrape, and quotas that survive a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from kafka.protocol.admin import AlterClientQuotasRequest as A
from kafka.protocol.admin import DescribeClientQuotasRequest as D

from streambus.cluster.scram_credentials import record_for
from streambus.security.credentials import make_credential
from tests.harness import (
    BrokerThread,
    ClusterProcesses,
    RawClient,
    fetch_request,
    total,
    wait_until,
)

QUOTA = 100 * 1024  # bytes per second
WINDOW = {"quota_window_num": 2, "quota_window_size_seconds": 1.0}


def alter(
    bootstrap: str, entity: list[tuple[str, str | None]], ops: dict[str, float | None]
) -> Any:
    request = A(
        entries=[
            A.EntryData(
                entity=[A.EntryData.EntityData(entity_type=t, entity_name=n) for t, n in entity],
                ops=[
                    A.EntryData.OpData(key=k, value=v or 0.0, remove=v is None)
                    for k, v in ops.items()
                ],
            )
        ],
        validate_only=False,
    )
    with RawClient(bootstrap) as client:
        return client.request(request, 1)


def describe(
    bootstrap: str, components: list[tuple[str, int, str | None]], strict: bool = False
) -> dict[tuple[tuple[str, str | None], ...], dict[str, float]]:
    request = D(
        components=[
            D.ComponentData(entity_type=t, match_type=m, match=n) for t, m, n in components
        ],
        strict=strict,
    )
    with RawClient(bootstrap) as client:
        response = client.request(request, 1)
    assert response.error_code == 0, response.error_message
    return {
        tuple((e.entity_type, e.entity_name) for e in entry.entity): {
            v.key: v.value for v in entry.values
        }
        for entry in response.entries
    }


def test_quotas_are_altered_described_validated_and_survive_a_restart(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data") as b:
        ok = alter(b.bootstrap, [("client-id", "slow")], {"producer_byte_rate": QUOTA})
        assert [e.error_code for e in ok.entries] == [0]
        alter(b.bootstrap, [("client-id", None)], {"consumer_byte_rate": 5e6})
        alter(b.bootstrap, [("user", None), ("client-id", "slow")], {"request_percentage": 50})
        # an ip's only quota is its connection creation rate (tests/test_ip_quotas.py)
        bad = alter(b.bootstrap, [("ip", "1.2.3.4")], {"producer_byte_rate": 1})
        assert bad.entries[0].error_code == 42  # INVALID_REQUEST, with a reason
        assert "connection_creation_rate" in bad.entries[0].error_message
        odd = alter(b.bootstrap, [("host", "h")], {"producer_byte_rate": 1})
        assert odd.entries[0].error_code == 42
        assert "user and/or a client-id" in odd.entries[0].error_message
        unknown = alter(b.bootstrap, [("client-id", "x")], {"bytes_per_fortnight": 1})
        assert unknown.entries[0].error_code == 42
        negative = alter(b.bootstrap, [("client-id", "x")], {"producer_byte_rate": -5})
        assert negative.entries[0].error_code == 42

    with BrokerThread(tmp_path / "data") as b:  # the same data dir: a restart
        exact = describe(b.bootstrap, [("client-id", 0, "slow")], strict=True)
        assert exact == {(("client-id", "slow"),): {"producer_byte_rate": QUOTA}}
        defaults = describe(b.bootstrap, [("client-id", 1, None)], strict=True)
        assert defaults == {(("client-id", None),): {"consumer_byte_rate": 5e6}}
        every = describe(b.bootstrap, [("client-id", 2, None)])
        assert len(every) == 3  # non-strict: the (user, client-id) entry too
        assert describe(b.bootstrap, [("user", 1, None)]) == {
            (("client-id", "slow"), ("user", None)): {"request_percentage": 50.0}
        }
        removed = alter(b.bootstrap, [("client-id", None)], {"consumer_byte_rate": None})
        assert removed.entries[0].error_code == 0
        assert describe(b.bootstrap, [("client-id", 1, None)]) == {}


def _produce_for(
    bootstrap: str, client_id: str, seconds: float, **extra: str
) -> tuple[float, list[int]]:
    """Produce 1 KiB records as fast as the broker takes them; (delivered B/s, throttles).
    ``extra``: more producer settings (dots as underscores), e.g. its SASL login."""
    throttles: list[int] = []
    delivered = [0]

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            delivered[0] += len(msg.value())

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "linger.ms": 5,
            "batch.size": 16384,
            "queue.buffering.max.kbytes": 256,
            "throttle_cb": lambda event: throttles.append(int(event.throttle_time * 1000)),
            **{k.replace("_", "."): v for k, v in extra.items()},
        }
    )
    value = b"q" * 1024
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            producer.produce("quota", value, on_delivery=on_delivery)
        except BufferError:
            producer.poll(0.01)
        producer.poll(0)
    elapsed = time.monotonic() - started
    counted = delivered[0]  # delivered while producing: what the rate is
    producer.flush(30)
    return counted / elapsed, throttles


def test_a_producer_over_its_quota_is_held_near_the_rate_another_is_not(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        alter(b.bootstrap, [("client-id", "slow")], {"producer_byte_rate": QUOTA})
        slow_rate, slow_throttles = _produce_for(b.bootstrap, "slow", 6.0)
        fast_rate, fast_throttles = _produce_for(b.bootstrap, "fast", 2.0)
        samples = b.scrape()
    # Held near the quota: the first window's burst allows some more; generous bounds.
    assert QUOTA * 0.3 < slow_rate < QUOTA * 2, slow_rate
    assert slow_throttles, "no throttle_time_ms reached the producer"
    assert max(slow_throttles) > 0
    assert not fast_throttles
    assert fast_rate > QUOTA  # unthrottled, it goes well past the other's quota
    count = total(samples, "streambus_throttle_time_seconds_count", type="produce")
    seconds = total(samples, "streambus_throttle_time_seconds_sum", type="produce")
    assert count > 0
    assert seconds > 0
    assert total(samples, "streambus_throttle_time_seconds_count", type="fetch") == 0


def test_a_user_quota_applies_to_that_authenticated_user_only(tmp_path: Path) -> None:
    listeners = "PLAINTEXT://127.0.0.1:0,SASL_PLAINTEXT://127.0.0.1:0"
    with BrokerThread(tmp_path / "data", listeners=listeners, **WINDOW) as b:
        for user in ("alice", "bob"):
            record = record_for(user, "SCRAM-SHA-256", make_credential("SCRAM-SHA-256", "pw"))
            assert b.call(b.broker.credentials.submit(record)).ok
        alter(b.bootstrap, [("user", "alice")], {"producer_byte_rate": QUOTA})
        sasl = f"127.0.0.1:{b.broker.listener_port('SASL_PLAINTEXT')}"

        def login(user: str) -> dict[str, str]:
            return {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": user,
                "sasl_password": "pw",
            }

        # One client id for both: only the principal tells them apart.
        alice_rate, alice_throttles = _produce_for(sasl, "app", 4.0, **login("alice"))
        bob_rate, bob_throttles = _produce_for(sasl, "app", 2.0, **login("bob"))
    assert alice_throttles, "the user quota did not throttle its user"
    assert alice_rate < QUOTA * 2, alice_rate
    assert not bob_throttles, "another user was throttled by alice's quota"
    assert bob_rate > QUOTA


def test_a_consumer_over_its_fetch_quota_is_throttled_and_muted(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", **WINDOW) as b:
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 5})
        for _ in range(200):
            producer.produce("fetched", b"f" * 1024)
        assert producer.flush(15) == 0
        # raw-test is the client id RawClient sends
        alter(b.bootstrap, [("client-id", "raw-test")], {"consumer_byte_rate": 10 * 1024})
        with RawClient(b.bootstrap) as client:
            first = client.request(fetch_request("fetched"), 12)
            assert first.throttle_time_ms > 0  # 200 KiB at once: far over 10 KiB/s
            sent = time.monotonic()
            second = client.request(fetch_request("fetched"), 12)
            waited = time.monotonic() - sent
        # Muted: the next request was not even read until the throttle time had passed.
        assert waited >= first.throttle_time_ms / 1000 * 0.9
        assert second.throttle_time_ms > 0
        samples = b.scrape()
        assert total(samples, "streambus_throttle_time_seconds_count", type="fetch") >= 2


def test_quota_records_apply_alike_and_survive_the_wire_and_snapshots() -> None:
    from streambus.cluster.records import AlterClientQuota, from_wire, to_wire
    from streambus.cluster.state import ClusterState, apply, state_from_wire, state_to_wire

    record = AlterClientQuota(
        (("client-id", None), ("user", "alice")), (("producer_byte_rate", 5.0),)
    )
    decoded = from_wire(to_wire(record))
    assert decoded == record
    state, result = apply(ClusterState(), decoded)
    assert result.ok
    assert state_from_wire(state_to_wire(state)).client_quotas == state.client_quotas
    unsorted = AlterClientQuota((("user", "a"), ("client-id", "b")), (("producer_byte_rate", 1.0),))
    same, refused = apply(state, unsorted)
    assert same is state
    assert refused.error_code == 42
    cleared, _ = apply(state, AlterClientQuota(record.entity, (("producer_byte_rate", None),)))
    assert dict(cleared.client_quotas) == {}


def test_a_quota_altered_on_one_broker_is_applied_on_every_broker(tmp_path: Path) -> None:
    env = {"STREAMBUS_BROKER_HEARTBEAT_INTERVAL_MS": "500", "PYTHONUNBUFFERED": "1"}
    with ClusterProcesses(tmp_path, 3, env=env) as c:
        brokers = list(c.brokers.values())

        def altered() -> bool:
            try:
                response = alter(
                    brokers[0].bootstrap, [("user", None)], {"producer_byte_rate": 7e5}
                )
            except OSError:
                return False
            return bool(response.entries[0].error_code == 0)

        wait_until(altered, timeout=60, interval=0.5)
        want = {(("user", None),): {"producer_byte_rate": 7e5}}
        for broker in brokers:
            wait_until(lambda b=broker: describe(b.bootstrap, [("user", 1, None)]) == want, 30)
