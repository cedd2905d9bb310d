"""TLS and basic auth for ``/metrics``, read from Prometheus' web config file.

The file is the one Prometheus and its exporters take with
``--web.config.file`` (exporter-toolkit's format), so one file serves both::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                         # optional
    basic_auth_users:
      prometheus: $2b$12$...                         # bcrypt, as htpasswd -B makes
    http_server_config:
      headers:                                       # added to every answer
        X-Content-Type-Options: nosniff

Relative paths are resolved against the file's directory, as the toolkit does.
TLS is 1.2 or newer whatever ``min_version`` asks. Passwords are checked with
the maintained ``bcrypt`` package, as Prometheus checks them. The certificate,
key and client CA files are checked for changes (mtime and size) before each
handshake, at most once a second, and a changed set is loaded into a new
context, as exporter-toolkit re-reads its TLS config per handshake: a renewed
certificate is served without a restart (a half-written one keeps the old).
The headers are exporter-toolkit's: only those it lets a user set, with its values.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from streambus.security.tls import file_stamps

#: exporter-toolkit's client_auth_type values and what each asks of the client.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: exporter-toolkit's settable response headers, with the values it allows (None: any);
#: any other header is refused, as it refuses them.
_SETTABLE_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
#: How often, at most, the TLS files are stat'ed for a change (per handshake otherwise).
_TLS_CHECK_INTERVAL_S = 1.0
_logger = logging.getLogger("streambus.telemetry")
#: Verified (user, password digest) pairs kept so a scrape every few seconds does not
#: pay bcrypt's deliberate cost each time; bounded, as any client can send credentials.
_VERIFIED_CACHE_MAX = 64


class WebConfigError(ValueError):
    """The web config file is unreadable or asks for something that cannot be served."""


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # a malformed hash: refused, never a crash of the scrape
        return False


class BasicAuth:
    """Checks an ``Authorization: Basic`` header against bcrypt-hashed users."""

    def __init__(self, users: Mapping[str, str]) -> None:
        for name, hashed in users.items():
            if not str(hashed).startswith(("$2a$", "$2b$", "$2y$")):
                raise WebConfigError(f"basic_auth_users: {name!r} needs a bcrypt hash")
        self._check = _checkpw
        self._users = {str(k): str(v).encode("ascii") for k, v in users.items()}
        self._verified: dict[tuple[str, bytes], None] = {}
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).partition(b":")
            name = user.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self._users.get(name)
        if hashed is None:
            return False
        key = (name, hashlib.sha256(hashed + b"\0" + password).digest())
        with self._lock:
            if key in self._verified:
                return True
        if not self._check(password, hashed):
            return False
        with self._lock:
            if len(self._verified) >= _VERIFIED_CACHE_MAX:
                self._verified.pop(next(iter(self._verified)))
            self._verified[key] = None
        return True


class ReloadingTLS:
    """The TLS context of ``/metrics``, rebuilt when its files change on disk."""

    def __init__(self, base: Path, tls: Mapping[str, Any]) -> None:
        self._base = base
        self._tls = dict(tls)
        self.files = [
            _path(base, tls.get(key), key)
            for key in ("cert_file", "key_file", "client_ca_file")
            if key != "client_ca_file" or tls.get(key)
        ]
        self._lock = threading.Lock()
        self._stamp = file_stamps(self.files)
        self._checked = time.monotonic()
        self._context = _ssl_context(base, self._tls)  # WebConfigError at start: refused

    def context(self) -> ssl.SSLContext:
        """The context for the next handshake: a new one if the files changed since."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < _TLS_CHECK_INTERVAL_S:
                return self._context
            self._checked = now
            stamp = file_stamps(self.files)
            if stamp == self._stamp:
                return self._context
            self._stamp = stamp
            try:
                self._context = _ssl_context(self._base, self._tls)
            except WebConfigError as exc:
                _logger.error(
                    "/metrics TLS files changed but not reloaded (old ones kept): %s", exc
                )
            else:
                _logger.info("/metrics TLS certificates reloaded from %s", self.files[0])
            return self._context


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """What ``/metrics`` serves behind: TLS and/or basic auth (either may be None), and the
    headers added to every answer."""

    tls: ReloadingTLS | None = None
    basic_auth: BasicAuth | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the next handshake (reloaded if its files changed)."""
        return self.tls.context() if self.tls is not None else None


def _headers(http: object) -> tuple[tuple[str, str], ...]:
    if http is None:
        return ()
    if not isinstance(http, dict):
        raise WebConfigError("http_server_config must be a mapping")
    unknown = set(http) - {"headers", "http2"}
    if unknown:
        raise WebConfigError(f"http_server_config: unknown keys {sorted(unknown)}")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise WebConfigError("http_server_config.headers must be a mapping")
    out = []
    for name, value in headers.items():
        if name not in _SETTABLE_HEADERS:
            raise WebConfigError(f"HTTP header {name!r} can not be configured")
        allowed = _SETTABLE_HEADERS[name]
        text = str(value)
        if allowed is not None and text not in allowed:
            raise WebConfigError(f"invalid value for {name}: expected one of {list(allowed)}")
        if "\r" in text or "\n" in text:
            raise WebConfigError(f"HTTP header {name}: a value on one line expected")
        out.append((str(name), text))
    return tuple(out)


def _path(base: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"tls_server_config.{key} must be a file path")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _ssl_context(base: Path, tls: Mapping[str, Any]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    minimum = _TLS_VERSIONS.get(str(tls.get("min_version", "TLS12")))
    if minimum is None:
        raise WebConfigError("tls_server_config.min_version must be TLS12 or TLS13")
    context.minimum_version = minimum
    cert, key = (
        _path(base, tls.get("cert_file"), "cert_file"),
        _path(base, tls.get("key_file"), "key_file"),
    )
    auth_type = str(tls.get("client_auth_type", "NoClientCert"))
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config.client_auth_type {auth_type!r} is unknown")
    try:
        context.load_cert_chain(cert, key)
        if tls.get("client_ca_file"):
            context.load_verify_locations(_path(base, tls["client_ca_file"], "client_ca_file"))
        elif auth_type != "NoClientCert":
            # Python's ssl verifies any client certificate it asks for, so every type
            # that asks for one needs the CAs to verify it against.
            raise WebConfigError(f"client_auth_type {auth_type} needs client_ca_file")
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(f"tls_server_config: {exc}") from exc
    context.verify_mode = _CLIENT_AUTH[auth_type]
    return context


def load_web_config(path: Path) -> WebConfig:
    """Parse Prometheus' web config YAML at ``path``; :class:`WebConfigError` if unusable."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise WebConfigError(f"cannot read the metrics web config {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise WebConfigError(f"{path}: a mapping expected at the top")
    # http_server_config.http2 is accepted (and has no effect: HTTP/1.1 here) so
    # Prometheus' own file can be shared; its headers are served.
    unknown = set(document) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise WebConfigError(f"{path}: unknown keys {sorted(unknown)}")
    tls = document.get("tls_server_config")
    users = document.get("basic_auth_users")
    if tls is not None and not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    if users is not None and not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must be a mapping")
    base = path.parent
    return WebConfig(
        tls=ReloadingTLS(base, tls) if tls else None,
        basic_auth=BasicAuth(users) if users else None,
        headers=_headers(document.get("http_server_config")),
    )
