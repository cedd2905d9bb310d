"""The security side of observability: ``/metrics`` behind TLS and basic auth (Prometheus'
web config file) scraped by a real Prometheus, and HighAuthenticationFailures firing for
real failed SASL logins through a real Prometheus and Alertmanager to a webhook."""

from __future__ import annotations

import base64
import contextlib
import http.client
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from telemetry import (
    ANY_FREE_PORT,
    TelemetryConfig,
    WebConfigError,
    load_web_config,
    start_pipeline,
)
from tests.harness import BrokerProcess, BrokerThread, RawClient, wait_until
from tests.security_certs import make_certs
from tests.test_alerts import AlertPipeline, live_alert_test
from tests.test_prometheus_server import PROMETHEUS, PrometheusServer
from tests.test_security_auth import WRONG, add_user, plain_login

# What a client sees of a refused TLS handshake: an alert, a reset, or urllib wrapping either.
REFUSED = (ssl.SSLError, ConnectionError, urllib.error.URLError)
SCRAPER, SCRAPER_PASSWORD = "prometheus", "scrape-me-please"


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash as ``htpasswd -B`` makes (cost 4: the test's scrapes stay quick)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def web_config(directory: Path) -> tuple[Path, Path]:
    """(web config file, CA file): TLS with a test CA's server certificate, one bcrypt user."""
    certs = make_certs(directory)
    path = directory / "web.yml"
    path.write_text(
        "tls_server_config:\n"
        f"  cert_file: {certs.server_cert.name}\n"  # relative: resolved beside the file
        f"  key_file: {certs.server_key}\n"
        "basic_auth_users:\n"
        f"  {SCRAPER}: '{bcrypt_hash(SCRAPER_PASSWORD)}'\n"
    )
    return path, certs.ca


def _get(url: str, context: ssl.SSLContext, auth: tuple[str, str] | None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _plain_get(port: int) -> bytes:
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        plain.request("GET", "/metrics")
        return plain.getresponse().read()
    finally:
        plain.close()


def test_web_config_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "web.yml"
    bad.write_text("basic_auth_users:\n  bob: not-a-bcrypt-hash\n")
    with pytest.raises(WebConfigError, match="bcrypt"):
        load_web_config(bad)
    bad.write_text("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n")
    with pytest.raises(WebConfigError, match="tls_server_config"):
        load_web_config(bad)
    certs = make_certs(tmp_path / "certs")
    bad.write_text(
        "tls_server_config:\n"
        f"  cert_file: {certs.server_cert}\n"
        f"  key_file: {certs.server_key}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
    )
    with pytest.raises(WebConfigError, match="needs client_ca_file"):
        load_web_config(bad)
    bad.write_text("tls_sever_config: {}\n")
    with pytest.raises(WebConfigError, match="unknown keys"):
        load_web_config(bad)


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus comes with `make install`")
def test_prometheus_scrapes_metrics_over_tls_with_basic_auth(tmp_path: Path) -> None:
    config, ca = web_config(tmp_path / "certs")
    broker = BrokerProcess(tmp_path / "data", "--metrics-web-config", str(config)).start()
    try:
        url = f"https://127.0.0.1:{broker.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(ca))
        wait_until(lambda: _get(url, context, (SCRAPER, SCRAPER_PASSWORD)) == 200, timeout=30)
        assert _get(url, context, None) == 401
        assert _get(url, context, (SCRAPER, "wrong")) == 401
        assert _get(url, context, ("nobody", SCRAPER_PASSWORD)) == 401
        # Plaintext HTTP to the TLS port gets no exposition, and the port keeps serving.
        with pytest.raises((OSError, http.client.HTTPException)):
            _plain_get(broker.metrics_port)
        assert _get(url, context, (SCRAPER, SCRAPER_PASSWORD)) == 200

        prom = PrometheusServer(
            tmp_path / "prom",
            f"127.0.0.1:{broker.metrics_port}",
            scrape_options=(
                "    scheme: https\n"
                f"    tls_config: {{ca_file: '{ca}'}}\n"
                f"    basic_auth: {{username: {SCRAPER}, password: {SCRAPER_PASSWORD}}}\n"
            ),
        )
        try:
            wait_until(
                lambda: [r["value"][1] for r in prom.query('up{job="streambus"}')] == ["1"],
                timeout=60,
                interval=0.5,
            )
            wait_until(lambda: prom.query("streambus_broker_status == 2"), timeout=30)
        finally:
            prom.stop()
    finally:
        broker.stop()


FLOOD_THREADS = 6
# rate(...[5m]) > 10 needs more than 3000 failures inside the window: Prometheus divides
# the (barely extrapolated) increase by the whole 300 s range. So the flood goes on, from
# several clients, until the alert arrives (or the deadline passes).


@live_alert_test
def test_high_authentication_failures_reaches_alertmanager_webhook(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        alerting = AlertPipeline(stack, tmp_path)
        b = stack.enter_context(
            BrokerThread(
                tmp_path / "data",
                listeners="SASL_PLAINTEXT://127.0.0.1:0",
                connection_failed_authentication_delay_ms=0,
            )
        )
        add_user(b, "alice", "correct-horse-battery")
        prom = alerting.scrape(b)

        address = f"127.0.0.1:{b.broker.listener_port('SASL_PLAINTEXT')}"
        refused: list[int] = []

        flooding = threading.Event()
        flooding.set()

        def flood() -> None:
            while flooding.is_set():
                with RawClient(address) as raw:
                    refused.append(plain_login(raw, WRONG).error_code)

        workers = [threading.Thread(target=flood) for _ in range(FLOOD_THREADS)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 240
        delivered: list[dict[str, Any]] = []
        try:
            while not delivered and time.monotonic() < deadline:
                delivered = alerting.delivered("HighAuthenticationFailures")
                time.sleep(0.5)
        finally:
            flooding.clear()
            for worker in workers:
                worker.join(60)
        assert len(refused) > 3000
        assert set(refused) == {58}  # SASL_AUTHENTICATION_FAILED, each of them
        assert delivered, (
            "no HighAuthenticationFailures at the webhook; Prometheus saw "
            f"rate={prom.query('rate(streambus_authentication_failures_total[5m])')} "
            f"alerts={prom.query('ALERTS')}"
        )
        alert = delivered[0]
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["mechanism"] == "PLAIN"
        assert alert["labels"]["listener"] == "SASL_PLAINTEXT"
        assert alert["labels"]["reason"] == "invalid_credentials"


def test_metrics_require_a_client_certificate_when_configured(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    config = tmp_path / "web.yml"
    config.write_text(
        "tls_server_config:\n"
        f"  cert_file: {certs.server_cert}\n"
        f"  key_file: {certs.server_key}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {certs.ca}\n"
        "  min_version: TLS13\n"
    )
    pipeline = start_pipeline(
        TelemetryConfig(
            metrics_host="127.0.0.1",
            metrics_port=ANY_FREE_PORT,
            tracing=False,
            web_config=load_web_config(config),
        ),
        set_global=False,
    )
    try:
        assert pipeline.metrics_address is not None
        url = f"https://127.0.0.1:{pipeline.metrics_address[1]}/metrics"
        anonymous = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises(REFUSED):  # refused in the handshake: no certificate
            _get(url, anonymous, None)
        with_cert = ssl.create_default_context(cafile=str(certs.ca))
        with_cert.load_cert_chain(certs.client_cert, certs.client_key)
        assert _get(url, with_cert, None) == 200
        old = ssl.create_default_context(cafile=str(certs.ca))
        old.load_cert_chain(certs.client_cert, certs.client_key)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(REFUSED):  # below min_version
            _get(url, old, None)
    finally:
        pipeline.shutdown()
