"""deploy/prometheus: promtool validates the config and the rules and runs their unit tests;
a real Prometheus evaluates the rules against a broker whose consumer group lags, and a real
Alertmanager delivers HighConsumerLag to a webhook served by the test."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, BrokerThread, free_port, wait_for_port
from tests.test_prometheus_server import PROMETHEUS, PrometheusServer

DEPLOY = ROOT / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
PROMTOOL = shutil.which("promtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool comes with `make install`")

# The observability example's four alerts, as its README writes them.
SEED_ALERTS = [
    """\
- alert: HighProduceLatency
  expr: histogram_quantile(0.99, rate(streambus_produce_latency_seconds_bucket[5m])) > 0.1
  for: 5m
  labels:
    severity: warning
  annotations:
    summary: "High produce latency detected"
    description: "99th percentile produce latency is {{ $value }}s"
""",
    """\
- alert: HighConsumerLag
  expr: streambus_consumer_group_lag > 1000
  for: 5m
  labels:
    severity: warning
  annotations:
    summary: "High consumer group lag"
    description: "Consumer group lag is {{ $value }} messages"
""",
    """\
- alert: HighAuthenticationFailures
  expr: rate(streambus_authentication_failures_total[5m]) > 10
  for: 5m
  labels:
    severity: critical
  annotations:
    summary: "High authentication failure rate"
    description: "{{ $value }} authentication failures per second"
""",
    "- alert: StorageAlmostFull\n"
    "  expr: (streambus_storage_used_bytes / (streambus_storage_used_bytes"
    " + streambus_storage_available_bytes)) > 0.85\n"
    "  for: 10m\n"
    "  labels:\n"
    "    severity: warning\n"
    "  annotations:\n"
    '    summary: "Storage is almost full"\n'
    '    description: "Storage is {{ $value | humanizePercentage }} full"\n',
]
# The example's job, interval and labels, its one target now the three brokers of `make cluster`.
SEED_SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: 'streambus'
    scrape_interval: 15s
    static_configs:
      - targets: ['localhost:19090', 'localhost:29090', 'localhost:39090']
        labels:
          env: 'dev'
          service: 'streambus'
"""
REPLICATION_ALERTS = {
    "StreamBusUnderReplicatedPartitions",
    "StreamBusUnderMinIsrPartitions",
    "HighReplicationLatency",
    "StreamBusIsrChurn",
}
TRANSACTION_ALERTS = {
    "StreamBusTransactionOpenTooLong",
    "StreamBusTransactionAbortRate",
    "StreamBusTransactionTimeouts",
}
SCHEMA_ALERTS = {"StreamBusSchemaValidationErrors"}
OPERATOR_ALERTS = {
    "StreamBusDown",
    "BrokerNotRunning",
    "StreamBusRestarting",
    "StreamBusConnectionSpike",
    "StreamBusNetworkErrors",
    "StreamBusRequestsFailing",
    "StreamBusUnexpectedErrors",
    "HighConsumeLatency",
    "HighCommitLatency",
    "ConsumerGroupLagGrowing",
    "ProduceTrafficStopped",
    "StorageFillingFast",
    "StreamBusNoController",
    "StreamBusMultipleControllers",
    "StreamBusBrokerMissing",
    "StreamBusOfflinePartitions",
    "StreamBusControllerElections",
    *REPLICATION_ALERTS,
    *TRANSACTION_ALERTS,
    *SCHEMA_ALERTS,
}
SEED_NAMES = {
    "HighProduceLatency",
    "HighConsumerLag",
    "HighAuthenticationFailures",
    "StorageAlmostFull",
}
# Metrics the rules may use besides the README's table: the consumer-group family, and the
# example's authentication counter (HighAuthenticationFailures is kept as the example wrote it).
GROUP_METRICS = {
    "streambus_consumer_groups_total",
    "streambus_consumer_group_members_total",
    "streambus_consumer_group_lag",
    "streambus_commit_latency_seconds",
}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, check=False, cwd=ROOT, timeout=60
    )


def rules() -> dict[str, str]:
    """alert name -> its rule's text in alerts.yml."""
    text = ALERTS.read_text()
    starts = [m.start() for m in re.finditer(r"^\s*- alert: ", text, re.M)]
    out: dict[str, str] = {}
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        chunk = text[start:end]
        name = re.search(r"- alert: (\w+)", chunk)
        assert name is not None
        out[name.group(1)] = chunk
    return out


def documented_metrics() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `(streambus_\w+)` \|", readme, re.M)) | GROUP_METRICS


# ------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(OPERATOR_ALERTS) + len(SEED_NAMES)} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    result = run_promtool("test", "rules", "deploy/prometheus/alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_prometheus_config_is_valid_and_loads_the_rules(tmp_path: Path) -> None:
    # as the README runs it, from the repository root
    result = run_promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
    # and from a copy elsewhere: rule_files resolve beside the config, not the working dir
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_is_the_examples() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    assert SEED_SCRAPE_CONFIG in text
    assert re.search(r"^rule_files:\n  - alerts\.yml$", text, re.M)
    assert "        - targets: ['localhost:9093']" in text


# ------------------------------------------------------------------ the rules themselves


def test_the_examples_four_alerts_are_kept_verbatim() -> None:
    text = ALERTS.read_text()
    for block in SEED_ALERTS:
        indented = "".join(
            "      " + line if line.strip() else line for line in block.splitlines(1)
        )
        assert indented in text, block


def test_alert_list_and_runbooks() -> None:
    found = rules()
    assert set(found) == SEED_NAMES | OPERATOR_ALERTS
    for name in OPERATOR_ALERTS:
        rule = found[name]
        assert re.search(r"severity: (critical|warning|info)\n", rule), name
        assert "summary: " in rule, name
        for part in ("What it means:", "What to check:", "What to do:"):
            assert part in rule, (name, part)


def test_rules_use_only_metrics_streambus_exports() -> None:
    known = documented_metrics() | {"streambus_authentication_failures_total"}
    for name, rule in rules().items():
        expr = rule.split("expr:", 1)[1].split("labels:", 1)[0]
        for metric in re.findall(r"streambus_\w+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert metric in known or base in known, (name, metric)
        if name == "StreamBusDown":
            assert 'up{job="streambus"} == 0' in expr


def groups() -> dict[str, list[str]]:
    """group name -> the alert names of its rules, in alerts.yml."""
    import yaml

    loaded = yaml.safe_load(ALERTS.read_text())
    return {g["name"]: [r["alert"] for r in g["rules"]] for g in loaded["groups"]}


def test_replication_rules() -> None:
    assert set(groups()["streambus-replication"]) == REPLICATION_ALERTS
    found = rules()
    # offline partitions have one alert, in the cluster group: no second one for replication
    on_offline = [name for name, rule in found.items() if "streambus_offline_partitions" in rule]
    assert on_offline == ["StreamBusOfflinePartitions"], on_offline
    assert (
        "streambus_under_replicated_partitions > 0" in found["StreamBusUnderReplicatedPartitions"]
    )
    under_min_isr = found["StreamBusUnderMinIsrPartitions"]
    assert "streambus_under_min_isr_partitions > 0" in under_min_isr
    assert "severity: critical" in under_min_isr
    assert "NOT_ENOUGH_REPLICAS" in under_min_isr
    assert (
        "histogram_quantile(0.99, rate(streambus_replication_latency_seconds_bucket[5m]))"
        in found["HighReplicationLatency"]
    )
    churn = found["StreamBusIsrChurn"]
    assert 'streambus_isr_changes_total{kind="shrink"}' in churn
    assert 'streambus_isr_changes_total{kind="expand"}' in churn


def test_transaction_rules() -> None:
    assert set(groups()["streambus-transactions"]) == TRANSACTION_ALERTS
    found = rules()
    open_too_long = found["StreamBusTransactionOpenTooLong"]
    # 60 s: Kafka's default transaction.timeout.ms, which the runbook names
    assert "streambus_transaction_oldest_open_seconds > 60" in open_too_long
    assert "for: 2m" in open_too_long
    assert "transaction.timeout.ms" in open_too_long
    assert "should have aborted it" in open_too_long
    abort_rate = found["StreamBusTransactionAbortRate"]
    assert "increase(streambus_transactions_aborted_total[10m])" in abort_rate
    assert "increase(streambus_transactions_committed_total[10m])" in abort_rate
    assert "> 0.1" in abort_rate
    assert ">= 10" in abort_rate  # a minimum volume: one abort among a few does not fire
    timeouts = found["StreamBusTransactionTimeouts"]
    assert 'streambus_transactions_aborted_total{reason="timeout"}' in timeouts


def test_every_alert_is_in_the_operators_list() -> None:
    listed = re.findall(
        r"^\| `(\w+)` \| (\w+) \|", (ROOT / "deploy" / "README.md").read_text(), re.M
    )
    assert {name for name, _ in listed} == set(rules())
    found = rules()
    for name, severity in listed:
        assert f"severity: {severity}\n" in found[name], name
    # the top README's table: the cluster's, replication's and transactions' alerts
    top = set(
        re.findall(
            r"^\| `(\w+)` \| (?:critical|warning|info) \|", (ROOT / "README.md").read_text(), re.M
        )
    )
    assert set(groups()["streambus-cluster"]) | REPLICATION_ALERTS | TRANSACTION_ALERTS == top


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = (DEPLOY / "alerts.test.yml").read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?\n(\s+- exp_labels)?", tests, re.M)
    firing = {name for name, empty, labels in cases if not empty and labels}
    quiet = {name for name, empty, _ in cases if empty}
    assert firing == set(rules()), set(rules()) - firing
    assert quiet == set(rules()), set(rules()) - quiet


# ------------------------------------------------------------ live: Prometheus -> Alertmanager


class Webhook:
    """An HTTP server that records the JSON bodies Alertmanager posts to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self) -> list[dict[str, Any]]:
        return [a for body in list(self.bodies) for a in body["alerts"]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


class AlertmanagerServer:
    def __init__(self, workdir: Path, webhook_url: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / "alertmanager.yml"
        config.write_text(
            "route:\n"
            "  receiver: webhook\n"
            "  group_by: ['alertname', 'group']\n"
            "  group_wait: 1s\n"
            "  group_interval: 1s\n"
            "  repeat_interval: 1h\n"
            "receivers:\n"
            "  - name: webhook\n"
            "    webhook_configs:\n"
            f"      - url: '{webhook_url}'\n"
            "        send_resolved: false\n"
        )
        assert ALERTMANAGER is not None
        self._log = open(workdir / "alertmanager.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={config}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",  # no gossip port: a single instance
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc, timeout=30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._log.close()


def fast_rules(workdir: Path) -> Path:
    """alerts.yml with every ``for:`` shortened to 1s; nothing else changes."""
    original = ALERTS.read_text()
    fast = re.sub(r"^(\s+for: )\S+$", r"\g<1>1s", original, flags=re.M)
    changed = [
        (a, b) for a, b in zip(original.splitlines(), fast.splitlines(), strict=True) if a != b
    ]
    assert changed
    assert all(a.strip().startswith("for: ") for a, _ in changed)
    path = workdir / "alerts.yml"
    path.write_text(fast)
    return path


def live_alert_test(test: Any) -> Any:
    """A test that sends an alert through a real Prometheus and Alertmanager."""
    needs_prometheus = pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus comes with `make install`"
    )
    needs_alertmanager = pytest.mark.skipif(
        ALERTMANAGER is None, reason="needs the prometheus-alertmanager package"
    )
    return pytest.mark.slow(needs_prometheus(needs_alertmanager(test)))


class AlertPipeline:
    """Alertmanager posting to a webhook; ``scrape`` adds the Prometheus that scrapes a
    broker with the shipped rules (``for:`` shortened) and sends Alertmanager its alerts.
    Everything it starts is stopped by ``stack``."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = stack
        self.webhook = Webhook()
        stack.callback(self.webhook.stop)
        self.alertmanager = AlertmanagerServer(workdir / "am", self.webhook.url)
        stack.callback(self.alertmanager.stop)

    def scrape(self, broker: BrokerThread) -> PrometheusServer:
        target = broker.metrics_url.removeprefix("http://").removesuffix("/metrics")
        prom = PrometheusServer(
            self.workdir / "prom",
            target,
            rule_files=[fast_rules(self.workdir)],
            alertmanagers=[self.alertmanager.address],
            extra_args=["--rules.alert.resend-delay=1s"],
        )
        self._stack.callback(prom.stop)
        return prom

    def delivered(self, alertname: str) -> list[dict[str, Any]]:
        return [a for a in self.webhook.alerts() if a["labels"]["alertname"] == alertname]


LAG_TOPIC = "lagging"
LAG_GROUP = "lagging-readers"
PRODUCED = 1200
COMMITTED = 10  # lag = 1200 - 10 = 1190, past HighConsumerLag's 1000


@live_alert_test
def test_high_consumer_lag_reaches_alertmanager_webhook(tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    with contextlib.ExitStack() as stack:
        alerting = AlertPipeline(stack, tmp_path)
        b = stack.enter_context(BrokerThread(tmp_path / "data"))
        b.run(b.broker.create_topic, LAG_TOPIC, 1, {})
        prom = alerting.scrape(b)

        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 20})
        for i in range(PRODUCED):
            producer.produce(LAG_TOPIC, b"v" * 50, str(i).encode())
        assert producer.flush(20) == 0
        consumer = Consumer(
            {
                "bootstrap.servers": b.bootstrap,
                "group.id": LAG_GROUP,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        stack.callback(consumer.close)
        consumer.subscribe([LAG_TOPIC])
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            polled = consumer.poll(0.5)
            if polled is not None and polled.error() is None:
                message = polled
        assert message is not None, "the group consumer got no partition assigned"
        consumer.commit(offsets=[TopicPartition(LAG_TOPIC, 0, COMMITTED)], asynchronous=False)

        deadline = time.monotonic() + 45
        delivered: list[dict[str, Any]] = []
        while not delivered and time.monotonic() < deadline:
            delivered = alerting.delivered("HighConsumerLag")
            time.sleep(0.5)
        assert delivered, (
            "no HighConsumerLag at the webhook; Prometheus saw "
            f"lag={prom.query('streambus_consumer_group_lag')} "
            f"alerts={prom.query('ALERTS')}"
        )
        alert = delivered[0]
        assert alert["status"] == "firing"
        assert alert["labels"]["group"] == LAG_GROUP
        assert alert["labels"]["topic"] == LAG_TOPIC
        assert alert["labels"]["partition"] == "0"
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["broker_id"] == "1"
        assert alert["labels"]["job"] == "streambus"
        lag = PRODUCED - COMMITTED
        assert alert["annotations"] == {
            "summary": "High consumer group lag",
            "description": f"Consumer group lag is {lag} messages",
        }
