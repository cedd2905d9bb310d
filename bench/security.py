"""What TLS and SASL cost produce throughput: one broker, three listeners, one producer each.

One ``streambus serve`` subprocess listens on PLAINTEXT, SSL and SASL_SSL (SCRAM-SHA-512)
at once, with a certificate made for the run; one confluent-kafka producer per listener
sends ``--messages`` values of ``--value-bytes`` to its own 3-partition topic (acks=all),
timed from the first ``produce()`` to ``flush()`` returning. Listeners run interleaved over
``--rounds`` so machine drift spreads over all of them; the median of each is reported.
SASL costs once per connection (the login), TLS per byte: the rows show the second.

Run: ``.venv/bin/python -m bench.security [--rounds 3] [--messages 100000]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from bench.common import ROOT, free_port, terminate, wait_for_port

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL")
USER, SECRET = "bench", "bench-password-1"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args(argv)
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
            value = b"x" * args.value_bytes
            for _ in range(args.rounds):
                for p in PROTOCOLS:
                    config = _client(p, ports[p], certs.ca)
                    rates[p].append(_produce(config, f"bench-{p.lower()}", args.messages, value))
        finally:
            terminate(proc)
            log.close()
    base = statistics.median(rates["PLAINTEXT"])
    print(f"| listener | msgs/s (median of {args.rounds}) | vs PLAINTEXT |")
    print("|---|---|---|")
    for p in PROTOCOLS:
        rate = statistics.median(rates[p])
        print(f"| {p} | {rate:,.0f} | {rate / base - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
