"""A broker hosting no copy of `_schemas` (four brokers, three replicas) follows it from the
partition's leader over the Kafka protocol: it serves a schema registered through another
broker and validates produced records against it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.harness import wait_until
from tests.test_cluster import wait_cluster_size
from tests.test_replication import REPL_ENV, wait_in_sync
from tests.test_schema_registry_cluster import (
    AVRO_V1,
    CT,
    RegistryCluster,
    get,
    produce,
    register,
    registry_url,
)

pytestmark = pytest.mark.slow

TIMEOUT = 90.0


def test_broker_without_a_copy_follows_the_leader(tmp_path: Path) -> None:
    with RegistryCluster(tmp_path, 4, env=REPL_ENV) as cluster:
        wait_cluster_size(cluster, 4)
        answer = httpx.put(
            registry_url(cluster.brokers[1]) + "/config",
            content=json.dumps({"compatibility": "BACKWARD"}),
            headers={"Content-Type": CT},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        view = wait_in_sync(cluster, "_schemas", 1)[0]
        (outside,) = set(cluster.brokers) - set(view.replicas)
        bare = cluster.brokers[outside]
        inside = cluster.brokers[next(n for n in view.replicas if n != view.leader)]

        # Registered through a broker with a copy; the one without serves it.
        answer = register(inside, "readings-value", AVRO_V1)
        assert answer.status_code == 200, answer.text
        schema_id = answer.json()["id"]

        def served() -> bool:
            try:
                return get(bare, f"/schemas/ids/{schema_id}").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(served, TIMEOUT, 0.2)
        assert json.loads(get(bare, f"/schemas/ids/{schema_id}").json()["schema"]) == json.loads(
            AVRO_V1
        )
        assert get(bare, "/subjects/readings-value/versions").json() == [1]
        assert get(bare, "/config").json() == {"compatibilityLevel": "BACKWARD"}

        # A write sent to it is forwarded, and read back there at once.
        other = json.dumps(
            {"type": "record", "name": "Payment", "fields": [{"name": "amount", "type": "long"}]}
        )
        answer = register(bare, "payments-value", other)
        assert answer.status_code == 200, answer.text
        assert get(bare, f"/schemas/ids/{answer.json()['id']}").status_code == 200

        # Produce validation on a partition the bare broker leads.
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        topic = NewTopic("readings", 4, 3, config={"confluent.value.schema.validation": "true"})
        admin.create_topics([topic], operation_timeout=30)["readings"].result(60)
        partitions = wait_in_sync(cluster, "readings", 4)
        led = [p for p, v in partitions.items() if v.leader == outside]
        assert led, partitions
        good = b"\x00" + schema_id.to_bytes(4, "big") + b"\x02a" + b"\x00" * 8
        assert produce(cluster.bootstrap, "readings", {led[0]: good}) == {led[0]: None}
        unknown = b"\x00" + (schema_id + 1000).to_bytes(4, "big") + b"x"
        refused = produce(cluster.bootstrap, "readings", {led[0]: unknown})[led[0]]
        assert refused is not None
        assert refused.code() == KafkaError.INVALID_RECORD
