"""The schema registry on a three-broker cluster of `streambus serve` processes.

Writes land on the broker leading `_schemas` partition 0, wherever they arrive (the others
forward them); every broker follows the replicated `_schemas` and serves reads and validates
produced records from the same state. The `_schemas` leader is SIGKILLed: another broker
leads, a new registration gets a new, distinct id, and the killed broker catches up when it
comes back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from tests.harness import BrokerProcess, ClusterProcesses, free_port, wait_until
from tests.test_cluster import restart, wait_cluster_size
from tests.test_replication import REPL_ENV, partitions_of, wait_in_sync

pytestmark = pytest.mark.slow

CT = "application/vnd.schemaregistry.v1+json"
SCHEMAS = "_schemas"
TIMEOUT = 90.0
AVRO_V1 = json.dumps(
    {
        "type": "record",
        "name": "Reading",
        "namespace": "test",
        "fields": [{"name": "sensor", "type": "string"}, {"name": "value", "type": "double"}],
    }
)
AVRO_OTHER = json.dumps(
    {"type": "record", "name": "Payment", "fields": [{"name": "amount", "type": "long"}]}
)


class RegistryCluster(ClusterProcesses):
    """Three brokers, each serving the schema registry on a port of its own."""

    def process(self, node: int, **kwargs: Any) -> BrokerProcess:
        broker = super().process(node, **kwargs)
        broker.extra = (*broker.extra, "--schema-registry-port", str(free_port()))
        return broker


def registry_url(broker: BrokerProcess) -> str:
    return f"http://127.0.0.1:{broker.extra[broker.extra.index('--schema-registry-port') + 1]}"


def get(broker: BrokerProcess, path: str) -> httpx.Response:
    return httpx.get(registry_url(broker) + path, timeout=30)


def register(broker: BrokerProcess, subject: str, schema: str) -> httpx.Response:
    return httpx.post(
        f"{registry_url(broker)}/subjects/{subject}/versions",
        content=json.dumps({"schema": schema}),
        headers={"Content-Type": CT},
        timeout=60,
    )


def schemas_leader(cluster: ClusterProcesses) -> int:
    """The live broker every live broker reports as leading `_schemas` partition 0."""

    def agreed() -> int | None:
        live = cluster.live()
        leaders = {partitions_of(b.bootstrap, SCHEMAS).get(0) for b in live.values()}
        ids = {p.leader if p is not None else None for p in leaders}
        if len(ids) == 1:
            (leader,) = ids
            if leader in live:
                return leader
        return None

    return int(wait_until(agreed, TIMEOUT, 0.2))


def serves(broker: BrokerProcess, subject: str, versions: list[int], ids: list[int]) -> bool:
    try:
        if get(broker, f"/subjects/{subject}/versions").json() != versions:
            return False
        return all(get(broker, f"/schemas/ids/{i}").status_code == 200 for i in ids)
    except httpx.HTTPError:
        return False


def produce(bootstrap: str, topic: str, values: dict[int, bytes]) -> dict[int, KafkaError | None]:
    """One record to each partition given; partition -> its delivery error (None: stored)."""
    errors: dict[int, KafkaError | None] = {}
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "retries": 0})

    def delivered(err: KafkaError | None, msg: Any) -> None:
        errors[msg.partition()] = err

    for partition, value in values.items():
        producer.produce(topic, value, partition=partition, on_delivery=delivered)
    assert producer.flush(60) == 0
    return errors


def test_registry_across_a_cluster_with_failover(tmp_path: Path) -> None:
    with RegistryCluster(tmp_path, env=REPL_ENV) as cluster:
        wait_cluster_size(cluster, 3)
        first = cluster.brokers[1]
        # The first write creates _schemas, replicated on all three brokers.
        answer = httpx.put(
            registry_url(first) + "/config",
            content=json.dumps({"compatibility": "BACKWARD"}),
            headers={"Content-Type": CT},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        view = wait_in_sync(cluster, SCHEMAS, 1)[0]
        assert len(view.replicas) == 3
        leader = schemas_leader(cluster)
        follower = next(n for n in cluster.brokers if n != leader)
        other = next(n for n in cluster.brokers if n not in (leader, follower))

        # Registered through a broker that does not lead: forwarded, and readable there at once.
        answer = register(cluster.brokers[follower], "readings-value", AVRO_V1)
        assert answer.status_code == 200, answer.text
        first_id = answer.json()["id"]
        assert get(cluster.brokers[follower], f"/schemas/ids/{first_id}").json()["schema"]
        for broker in cluster.brokers.values():
            wait_until(lambda b=broker: serves(b, "readings-value", [1], [first_id]), TIMEOUT)
            latest = get(broker, "/subjects/readings-value/versions/latest").json()
            assert (latest["id"], latest["version"]) == (first_id, 1)

        # Validation on every broker's partitions, against what the followers applied.
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        topic = NewTopic("readings", 3, 3, config={"confluent.value.schema.validation": "true"})
        admin.create_topics([topic], operation_timeout=30)["readings"].result(60)
        partitions = wait_in_sync(cluster, "readings", 3)
        assert {p.leader for p in partitions.values()} == set(cluster.brokers)
        with SchemaRegistryClient({"url": registry_url(cluster.brokers[other])}) as client:
            serializer = AvroSerializer(client, AVRO_V1)
            ctx = SerializationContext("readings", MessageField.VALUE)
            good = {p: serializer({"sensor": f"s{p}", "value": p / 2}, ctx) for p in partitions}
        assert all(int.from_bytes(v[1:5], "big") == first_id for v in good.values())
        assert produce(cluster.bootstrap, "readings", good) == dict.fromkeys(partitions)
        unknown = b"\x00" + (first_id + 1000).to_bytes(4, "big") + b"x"
        refused = produce(cluster.bootstrap, "readings", dict.fromkeys(partitions, unknown))
        assert len(refused) == len(partitions)
        for err in refused.values():
            assert err is not None, refused
            assert err.code() == KafkaError.INVALID_RECORD, refused

        # The _schemas leader dies: another leads, and a registration gets a new id.
        cluster.brokers[leader].kill()
        live = cluster.live()
        new_leader = schemas_leader(cluster)
        assert new_leader != leader

        def registered() -> int | None:
            broker = next(iter(live.values()))
            answer = register(broker, "payments-value", AVRO_OTHER)
            return int(answer.json()["id"]) if answer.status_code == 200 else None

        second_id = wait_until(registered, TIMEOUT, 0.5)
        assert second_id != first_id
        for broker in live.values():
            wait_until(lambda b=broker: serves(b, "payments-value", [1], [second_id]), TIMEOUT)
            assert serves(broker, "readings-value", [1], [first_id])

        # The killed broker comes back and catches up.
        started = time.monotonic()
        restart(cluster, leader)
        back = cluster.brokers[leader]
        wait_until(lambda: serves(back, "payments-value", [1], [second_id]), TIMEOUT)
        assert serves(back, "readings-value", [1], [first_id])
        print(f"restarted broker caught up in {time.monotonic() - started:.1f} s")
