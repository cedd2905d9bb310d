"""``/metrics`` behind Prometheus' web config, as it changes under a running broker: renewed
certificate files are served at the next scrape without a restart, and the headers set in
``http_server_config.headers`` are on every answer (only those exporter-toolkit allows)."""

from __future__ import annotations

import os
import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from telemetry import WebConfigError, load_web_config
from tests.harness import BrokerProcess, wait_until
from tests.security_certs import Certs, make_certs

HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "deny"}


def install(certs: Certs, live: Path) -> None:
    """Put a certificate and its key in place the way a renewal does: each file replaced
    whole (written beside, then renamed over)."""
    for source, target in ((certs.server_key, "tls.key"), (certs.server_cert, "tls.crt")):
        shutil.copyfile(source, live / (target + ".new"))
        os.replace(live / (target + ".new"), live / target)


def served_certificate(port: int) -> x509.Certificate:
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode())


def scrape(url: str, ca: Path) -> tuple[int, dict[str, str]]:
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return int(response.status), dict(response.headers.items())


def test_renewed_certificates_and_configured_headers_are_served(tmp_path: Path) -> None:
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    install(old, live)
    config = live / "web.yml"
    config.write_text(
        "tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n"
        "http_server_config:\n  headers:\n" + "".join(f"    {k}: {v}\n" for k, v in HEADERS.items())
    )
    broker = BrokerProcess(tmp_path / "data", "--metrics-web-config", str(config))
    with broker:
        url = f"https://127.0.0.1:{broker.metrics_port}/metrics"
        assert wait_until(lambda: _scrapes(url, old.ca), timeout=30)
        status, headers = scrape(url, old.ca)
        assert status == 200
        for name, value in HEADERS.items():
            assert headers.get(name) == value, headers
        first = x509.load_pem_x509_certificate(old.server_cert.read_bytes())
        assert served_certificate(broker.metrics_port) == first

        install(new, live)
        renewed = x509.load_pem_x509_certificate(new.server_cert.read_bytes())
        assert wait_until(lambda: served_certificate(broker.metrics_port) == renewed, timeout=30)
        status, headers = scrape(url, new.ca)  # a client trusting only the new CA
        assert status == 200
        assert headers.get("X-Frame-Options") == "deny"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # not the old
            scrape(url, old.ca)

        # A half-written renewal (a key without its certificate) keeps the served one.
        (live / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\n")

        def kept() -> bool:  # each handshake is what checks the files
            return served_certificate(broker.metrics_port) == renewed and (
                "not reloaded" in broker.log_text()
            )

        assert wait_until(kept, timeout=30)
        assert served_certificate(broker.metrics_port) == renewed


def _scrapes(url: str, ca: Path) -> bool:
    try:
        return scrape(url, ca)[0] == 200
    except OSError:
        return False


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ("Set-Cookie: a=b", "can not be configured"),
        ("Server: streambus", "can not be configured"),
        ("X-Frame-Options: allow-from", "invalid value for X-Frame-Options"),
        ("X-Content-Type-Options: sniff", "invalid value for X-Content-Type-Options"),
    ],
)
def test_headers_exporter_toolkit_refuses_are_refused(
    tmp_path: Path, headers: str, refusal: str
) -> None:
    config = tmp_path / "web.yml"
    config.write_text(f"http_server_config:\n  headers:\n    {headers}\n")
    with pytest.raises(WebConfigError, match=refusal):
        load_web_config(config)


def test_allowed_headers_load(tmp_path: Path) -> None:
    config = tmp_path / "web.yml"
    config.write_text(
        "http_server_config:\n  http2: true\n  headers:\n"
        "    Strict-Transport-Security: max-age=31536000\n"
        "    Content-Security-Policy: default-src 'none'\n"
    )
    assert load_web_config(config).headers == (
        ("Strict-Transport-Security", "max-age=31536000"),
        ("Content-Security-Policy", "default-src 'none'"),
    )
