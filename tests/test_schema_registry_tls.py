"""The schema registry's REST API over HTTPS: Confluent's client with the CA, a plain-HTTP
request refused, client certificates required, a failed Basic login answered late, and a
three-broker cluster forwarding a write to the `_schemas` leader over HTTPS."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streambus.cluster.scram_credentials import record_for
from streambus.config import BrokerConfig
from streambus.errors import InvalidConfigError
from streambus.schemas.auth import FAILED_LOGIN_DELAY_S
from streambus.security.credentials import make_credential
from tests.harness import BrokerProcess, BrokerThread, ClusterProcesses, free_port, wait_until
from tests.security_certs import Certs, make_certs
from tests.test_cluster import wait_cluster_size
from tests.test_replication import REPL_ENV, partitions_of, wait_in_sync

CT = "application/vnd.schemaregistry.v1+json"
AVRO = json.dumps(
    {"type": "record", "name": "Reading", "fields": [{"name": "value", "type": "double"}]}
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("registry-certs"))


def tls_broker(data: Path, certs: Certs, **config: Any) -> BrokerThread:
    return BrokerThread(
        data,
        schema_registry_port=free_port(),
        schema_registry_protocol="https",
        schema_registry_ssl_certfile=certs.server_cert,
        schema_registry_ssl_keyfile=certs.server_key,
        schema_registry_ssl_cafile=certs.ca,
        **config,
    )


def url(b: BrokerThread, scheme: str = "https") -> str:
    return f"{scheme}://127.0.0.1:{b.broker.schema_registry_port}"


def trusting(certs: Certs, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[BrokerThread]:
    with tls_broker(tmp_path_factory.mktemp("srtls"), certs) as b:
        yield b


def test_confluent_client_registers_and_reads_over_https(https: BrokerThread, certs: Certs) -> None:
    conf = {"url": url(https), "ssl.ca.location": str(certs.ca)}
    with SchemaRegistryClient(conf) as client:
        schema_id = client.register_schema("readings-value", Schema(AVRO, "AVRO"))
        assert json.loads(client.get_schema(schema_id).schema_str) == json.loads(AVRO)
        assert client.get_latest_version("readings-value").schema_id == schema_id
    # A client that does not trust the CA does not get through.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url(https) + "/subjects", timeout=30)


def test_plain_http_to_the_https_port_fails(https: BrokerThread, certs: Certs) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(url(https, "http") + "/subjects", timeout=30)
    # The listener keeps serving HTTPS after it.
    answer = httpx.get(url(https) + "/schemas/types", verify=trusting(certs), timeout=30)
    assert answer.status_code == 200
    assert "AVRO" in answer.json()


def test_client_certificate_required(tmp_path: Path, certs: Certs) -> None:
    with tls_broker(tmp_path / "data", certs, schema_registry_ssl_client_auth="REQUIRED") as b:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url(b) + "/subjects", verify=trusting(certs), timeout=30)
        answer = httpx.get(url(b) + "/subjects", verify=trusting(certs, True), timeout=30)
        assert (answer.status_code, answer.json()) == (200, [])
        conf = {
            "url": url(b),
            "ssl.ca.location": str(certs.ca),
            "ssl.certificate.location": str(certs.client_cert),
            "ssl.key.location": str(certs.client_key),
        }
        with SchemaRegistryClient(conf) as client:
            assert client.register_schema("mtls-value", Schema(AVRO, "AVRO")) > 0


def test_failed_basic_login_is_answered_after_the_delay(tmp_path: Path, certs: Certs) -> None:
    with tls_broker(tmp_path / "data", certs, schema_registry_authentication="basic") as b:
        credential = make_credential("SCRAM-SHA-256", "right-password")
        assert b.call(
            b.broker.credentials.submit(record_for("alice", "SCRAM-SHA-256", credential))
        ).ok
        good = {"url": url(b), "ssl.ca.location": str(certs.ca)}
        with SchemaRegistryClient({**good, "basic.auth.user.info": "alice:right-password"}) as c:
            assert c.get_subjects() == []
        started = time.monotonic()
        with (
            SchemaRegistryClient({**good, "basic.auth.user.info": "alice:wrong"}) as c,
            pytest.raises(SchemaRegistryError) as refused,
        ):
            c.get_subjects()
        assert time.monotonic() - started >= FAILED_LOGIN_DELAY_S
        assert (refused.value.http_status_code, refused.value.error_code) == (401, 40101)


def test_https_needs_a_certificate() -> None:
    with pytest.raises(InvalidConfigError, match="schema registry HTTPS"):
        BrokerConfig.load({"schema_registry_protocol": "https"}, env={})
    with pytest.raises(InvalidConfigError, match="'http' or 'https'"):
        BrokerConfig.load({"schema_registry_protocol": "spdy"}, env={})


class TlsRegistryCluster(ClusterProcesses):
    """Brokers serving the registry over HTTPS with the Kafka listener's certificate files
    (``STREAMBUS_SSL_*``), each on a port of its own."""

    def process(self, node: int, **kwargs: Any) -> BrokerProcess:
        broker = super().process(node, **kwargs)
        broker.extra = (*broker.extra, "--schema-registry-port", str(free_port()))
        return broker


def cluster_url(broker: BrokerProcess) -> str:
    return f"https://127.0.0.1:{broker.extra[broker.extra.index('--schema-registry-port') + 1]}"


@pytest.mark.slow
def test_cluster_forwards_writes_over_https(tmp_path: Path, certs: Certs) -> None:
    env = {
        **REPL_ENV,
        "STREAMBUS_SCHEMA_REGISTRY_PROTOCOL": "https",
        "STREAMBUS_SSL_CERTFILE": str(certs.server_cert),
        "STREAMBUS_SSL_KEYFILE": str(certs.server_key),
        "STREAMBUS_SSL_CAFILE": str(certs.ca),
    }
    verify = trusting(certs)
    with TlsRegistryCluster(tmp_path, env=env) as cluster:
        wait_cluster_size(cluster, 3)
        first = cluster.brokers[1]
        answer = httpx.put(
            cluster_url(first) + "/config",
            content=json.dumps({"compatibility": "BACKWARD"}),
            headers={"Content-Type": CT},
            verify=verify,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        wait_in_sync(cluster, "_schemas", 1)

        def leader() -> int | None:
            view = partitions_of(cluster.bootstrap, "_schemas").get(0)
            return view.leader if view is not None and view.leader in cluster.brokers else None

        lead = int(wait_until(leader, 60, 0.2))
        follower = cluster.brokers[next(n for n in cluster.brokers if n != lead)]
        answer = httpx.post(
            cluster_url(follower) + "/subjects/readings-value/versions",
            content=json.dumps({"schema": AVRO}),
            headers={"Content-Type": CT},
            verify=verify,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        schema_id = answer.json()["id"]
        # Read-your-write on the forwarding broker; the third one follows.
        path = f"/schemas/ids/{schema_id}"
        got = httpx.get(cluster_url(follower) + path, verify=verify, timeout=30)
        assert got.status_code == 200, got.text
        for broker in cluster.brokers.values():
            wait_until(
                lambda b=broker: httpx.get(cluster_url(b) + path, verify=verify).status_code == 200,
                60,
            )
