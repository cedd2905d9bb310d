"""What TLS and SASL cost produce throughput: clients' listeners, and brokers' own listener.

One ``streambus serve`` subprocess listens on PLAINTEXT, SSL and SASL_SSL (SCRAM-SHA-512)
at once, with a certificate made for the run; one confluent-kafka producer per listener
sends ``--messages`` values of ``--value-bytes`` to its own 3-partition topic (acks=all),
timed from the first ``produce()`` to ``flush()`` returning. Listeners run interleaved over
``--rounds`` so machine drift spreads over all of them; the median of each is reported.
SASL costs once per connection (the login), TLS per byte: the rows show the second.

The inter-broker part: two three-broker clusters (``bench.replication.StreamBusCluster``)
run side by side, one whose brokers talk PLAINTEXT to each other, one whose inter-broker
listener is SASL_SSL (SCRAM-SHA-512, certificates verified, the brokers' user made through
the admin API once the quorum is up). Clients use a PLAINTEXT listener on both, so only the
brokers' own traffic (followers' fetches, WriteTxnMarkers) differs. One 3-partition topic
each, replication factor 3 and ``min.insync.replicas=2``, in sync on all three before the
first round; then acks=all produce as above, rounds interleaved between the two clusters.
What it shows is TLS on the replica fetch path (the logins are once per fetcher connection).

Run: ``.venv/bin/python -m bench.security [--quick] [--part listeners|inter-broker|all]``
(``--quick``: 1 round of 20,000 messages; the default 3 rounds of 100,000).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._scram import ScramCredentialInfo, ScramMechanism
from confluent_kafka.admin._scram import UserScramCredentialUpsertion as Upsertion
from confluent_kafka.cimpl import NewTopic

from bench.common import ROOT, free_port, terminate, wait_for_port
from bench.replication import StreamBusCluster, create_replicated_topic

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL")
USER, SECRET = "bench", "bench-password-1"
BROKER_USER, BROKER_SECRET = "broker", "bench-broker-password-1"
INTER_BROKER = ("PLAINTEXT", "SASL_SSL")
SCRAM_ITERATIONS = 4096


def _client(protocol: str, port: int, ca: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"bootstrap.servers": f"127.0.0.1:{port}"}
    if protocol != "PLAINTEXT":
        config.update({"security.protocol": protocol, "ssl.ca.location": str(ca)})
    if protocol == "SASL_SSL":
        config.update(
            {"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": USER, "sasl.password": SECRET}
        )
    return config


def _produce(config: dict[str, Any], topic: str, messages: int, value: bytes) -> float:
    producer = Producer({**config, "acks": "all", "linger.ms": 5})
    for _ in range(1000):  # warm-up: connections, login, metadata
        producer.produce(topic, value)
    producer.flush(30)
    started = time.perf_counter()
    for _ in range(messages):
        while True:
            try:
                producer.produce(topic, value)
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(120):
        raise RuntimeError("messages left unsent")
    return messages / (time.perf_counter() - started)


def _listener_rows(rounds: int, messages: int, value_bytes: int) -> dict[str, list[float]]:
    sys.path.insert(0, str(ROOT))
    from tests.security_certs import make_certs  # noqa: PLC0415 - a test helper, for the run

    with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp:
        root = Path(tmp)
        certs = make_certs(root / "certs")
        data = root / "data"
        subprocess.run(
            [sys.executable, "-m", "streambus", "users", "add", USER, "--data-dir", str(data)],
            input=SECRET + "\n",
            text=True,
            check=True,
            cwd=ROOT,
        )
        ports = {p: free_port() for p in PROTOCOLS}
        listeners = ",".join(f"{p}://127.0.0.1:{port}" for p, port in ports.items())
        log = (root / "broker.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "streambus", "serve", "--data-dir", str(data),
             "--listeners", listeners, "--metrics-port", "0", "--no-tracing",
             "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port(ports["PLAINTEXT"], proc, 60, "streambus", root / "broker.log")
            admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{ports['PLAINTEXT']}"})
            for f in admin.create_topics(
                [NewTopic(f"bench-{p.lower()}", 3, 1) for p in PROTOCOLS]
            ).values():
                f.result(30)
            rates: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
            value = b"x" * value_bytes
            for _ in range(rounds):
                for p in PROTOCOLS:
                    config = _client(p, ports[p], certs.ca)
                    rates[p].append(_produce(config, f"bench-{p.lower()}", messages, value))
        finally:
            terminate(proc)
            log.close()
    return rates


def _secure_inter_broker(cluster: StreamBusCluster, certs: Any) -> None:
    """Give each broker a SASL_SSL inter-broker listener beside its PLAINTEXT one."""
    for server in cluster.nodes.values():
        server.cmd += [
            "--listeners",
            f"PLAINTEXT://127.0.0.1:{server.port},SASL_SSL://127.0.0.1:{free_port()}",
            "--inter-broker-listener-name", "SASL_SSL",
            "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key),
            "--ssl-cafile", str(certs.ca),
            "--sasl-enabled-mechanisms", "SCRAM-SHA-512",
            "--sasl-mechanism-inter-broker-protocol", "SCRAM-SHA-512",
            "--inter-broker-sasl-username", BROKER_USER,
        ]  # fmt: skip
        server.env["STREAMBUS_INTER_BROKER_SASL_PASSWORD"] = BROKER_SECRET


def _add_broker_user(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upsert = Upsertion(BROKER_USER, info, BROKER_SECRET.encode())
    for f in admin.alter_user_scram_credentials([upsert]).values():
        f.result(30)


def _inter_broker_rows(rounds: int, messages: int, value_bytes: int) -> dict[str, list[float]]:
    sys.path.insert(0, str(ROOT))
    from tests.security_certs import make_certs  # noqa: PLC0415 - a test helper, for the run

    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ib-")))
        certs = make_certs(root / "certs")
        clusters: dict[str, StreamBusCluster] = {}
        for protocol in INTER_BROKER:
            (root / protocol.lower()).mkdir()
            cluster = StreamBusCluster(root / protocol.lower())
            if protocol == "SASL_SSL":
                _secure_inter_broker(cluster, certs)
            stack.callback(cluster.kill)
            cluster.start()
            clusters[protocol] = cluster
        _add_broker_user(clusters["SASL_SSL"].bootstrap)
        for protocol, cluster in clusters.items():
            took = create_replicated_topic(cluster.bootstrap, "bench-ib", 3)
            print(f"  inter-broker {protocol}: RF 3, min ISR 2, in sync after {took:.1f}s")
        rates: dict[str, list[float]] = {p: [] for p in INTER_BROKER}
        value = b"x" * value_bytes
        for _ in range(rounds):
            for protocol, cluster in clusters.items():
                config = {"bootstrap.servers": cluster.bootstrap}
                rates[protocol].append(_produce(config, "bench-ib", messages, value))
    return rates


def _print_rows(title: str, rates: dict[str, list[float]], rounds: int) -> None:
    base = statistics.median(rates["PLAINTEXT"])
    print(f"| {title} | msgs/s (median of {rounds}) | vs PLAINTEXT |")
    print("|---|---|---|")
    for p, values in rates.items():
        rate = statistics.median(values)
        print(f"| {p} | {rate:,.0f} | {rate / base - 1:+.1%} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 20,000 messages")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--messages", type=int)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--part", choices=("listeners", "inter-broker", "all"), default="all")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    messages = args.messages or (20_000 if args.quick else 100_000)
    if args.part in ("listeners", "all"):
        rates = _listener_rows(rounds, messages, args.value_bytes)
        _print_rows("listener (one broker)", rates, rounds)
    if args.part in ("inter-broker", "all"):
        rates = _inter_broker_rows(rounds, messages, args.value_bytes)
        if args.part == "all":
            print()
        _print_rows("inter-broker listener (3 brokers, RF 3, acks=all)", rates, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
