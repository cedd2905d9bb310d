"""How a broker dials another broker: the client side of the inter-broker listener.

Kafka's brokers are each other's clients (replica fetchers, the transaction
coordinator's WriteTxnMarkers), and speak the inter-broker listener's security
protocol (``security.inter.broker.protocol``) with the broker's own identity.
This module is the one place a broker connects to another:

1. TCP to the address the other broker registered for that listener;
2. on SSL and SASL_SSL, TLS 1.2+: the peer's certificate is verified against
   ``ssl.cafile`` (the system's CAs without one) and its name checked, unless
   ``ssl.endpoint.identification.algorithm`` is empty (Kafka's switch); the broker's
   own certificate is presented when the listeners require client certificates
   (``ssl.client.auth=required``), as Kafka's brokers use one keystore both ways.
   The context is rebuilt when those files change (checked at dial time, at most once
   a second), as the listeners reload theirs: renewed certificates need no restart, and
   a file caught half-written keeps the old context (one ERROR line per change);
3. on SASL_PLAINTEXT and SASL_SSL, SaslHandshake v1 and SaslAuthenticate v1 with
   ``sasl.mechanism.inter.broker.protocol``: PLAIN, or SCRAM-SHA-256/512 with the
   ``scramp`` library's client (its PBKDF2 runs in a worker thread).

A refused login raises SaslAuthenticationFailedError naming the broker, the
mechanism and the server's code and message; a TLS failure raises ``ssl.SSLError``.
Either is logged here on ONE WARNING line per broker until the reason changes or a
login succeeds (later repeats at DEBUG), so a wrong password does not fill the log
while the callers retry with their backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from pathlib import Path
from typing import Any, Protocol

from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)
from scramp import ScramClient, ScramException

from streambus.errors import InvalidConfigError, SaslAuthenticationFailedError, error_name
from streambus.security.listeners import MECHANISMS, PLAIN, Listener, SecurityProtocol
from streambus.security.tls import ClientAuth, file_stamps

log = logging.getLogger("streambus.security")

HANDSHAKE_VERSION = 1  # tokens in SaslAuthenticate requests (not bare frames)
AUTHENTICATE_VERSION = 1  # the first with session_lifetime_ms
# Reconnect this long before the server's session ends (connections.max.reauth.ms), so a
# request is never refused for an expired session.
REAUTH_MARGIN_S = 1.0
DECODE_IN_THREAD_OVER = 256 * 1024  # bytes of a response frame decoded in a worker thread
AUTHENTICATION_FAILURES = (SaslAuthenticationFailedError, ssl.SSLError)
TLS_RELOAD_CHECK_S = 1.0  # how often a dial looks at the TLS files' stamps


class SecurityConfig(Protocol):
    """What the dialer reads of the broker's configuration (``BrokerConfig`` is one)."""

    @property
    def sasl_mechanism_inter_broker_protocol(self) -> str: ...
    @property
    def inter_broker_sasl_username(self) -> str | None: ...
    @property
    def inter_broker_sasl_password(self) -> str | None: ...
    @property
    def inter_broker_sasl_password_file(self) -> Path | None: ...
    @property
    def ssl_endpoint_identification_algorithm(self) -> str: ...
    @property
    def ssl_cafile(self) -> Path | None: ...
    @property
    def ssl_certfile(self) -> Path | None: ...
    @property
    def ssl_keyfile(self) -> Path | None: ...
    @property
    def ssl_client_auth(self) -> str: ...
    def inter_broker_listener(self) -> Listener: ...
    def sasl_mechanisms(self) -> tuple[str, ...]: ...


def client_tls_context(
    cafile: Path | None,
    certfile: Path | None,
    keyfile: Path | None,
    *,
    present_certificate: bool,
    check_hostname: bool,
) -> ssl.SSLContext:
    """The TLS context a broker dials other brokers with (raises InvalidConfigError)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = check_hostname
        if present_certificate:
            if certfile is None:
                raise InvalidConfigError("ssl.client.auth=required needs --ssl-certfile")
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidConfigError(f"cannot build the inter-broker TLS context: {exc}") from exc
    return context


class ClientTls:
    """The client TLS context, rebuilt (in a worker thread) when its files change."""

    def __init__(
        self,
        cafile: Path | None,
        certfile: Path | None,
        keyfile: Path | None,
        *,
        present_certificate: bool,
        check_hostname: bool,
    ) -> None:
        self._cafile, self._certfile, self._keyfile = cafile, certfile, keyfile
        self._present = present_certificate
        self._check_hostname = check_hostname
        files = (cafile, certfile, keyfile) if present_certificate else (cafile,)
        self.files = tuple(p for p in files if p is not None)
        self._stamp = file_stamps(self.files)
        self._checked = time.monotonic()
        self.context = self._build()  # at startup: an unreadable file refuses to start

    def _build(self) -> ssl.SSLContext:
        return client_tls_context(
            self._cafile,
            self._certfile,
            self._keyfile,
            present_certificate=self._present,
            check_hostname=self._check_hostname,
        )

    async def current(self) -> ssl.SSLContext:
        """The context to dial with, rebuilt first if a file changed since the last look."""
        now = time.monotonic()
        if now - self._checked < TLS_RELOAD_CHECK_S:
            return self.context
        self._checked = now  # before the await: concurrent dials look once
        stamp = file_stamps(self.files)
        if stamp == self._stamp:
            return self.context
        self._stamp = stamp  # a half-written file is tried again at its next change
        try:
            self.context = await asyncio.to_thread(self._build)
        except InvalidConfigError as exc:
            log.error(
                "inter-broker TLS files changed but not reloaded (the old context stays): %s",
                exc,
            )
        else:
            log.info("inter-broker TLS context reloaded from %s", ", ".join(map(str, self.files)))
        return self.context


@dataclasses.dataclass(frozen=True, slots=True)
class InterBrokerSecurity:
    """What a broker's own connections to other brokers need."""

    protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    mechanism: str = PLAIN
    username: str = ""
    password: str | None = None
    password_file: Path | None = None  # read at each login, so a new secret needs no restart
    tls: ClientTls | None = None

    @classmethod
    def from_config(cls, config: SecurityConfig) -> InterBrokerSecurity:
        """The inter-broker listener's protocol, with this broker's credentials and TLS
        context (raises InvalidConfigError for what is missing or unreadable)."""
        protocol = config.inter_broker_listener().protocol
        mechanism = config.sasl_mechanism_inter_broker_protocol.strip().upper()
        security = cls(
            protocol,
            mechanism,
            config.inter_broker_sasl_username or "",
            config.inter_broker_sasl_password,
            config.inter_broker_sasl_password_file,
        )
        if protocol.sasl:
            if mechanism not in MECHANISMS:
                raise InvalidConfigError(
                    f"sasl.mechanism.inter.broker.protocol: {mechanism} is not one of "
                    f"{', '.join(MECHANISMS)}"
                )
            if mechanism not in config.sasl_mechanisms():
                raise InvalidConfigError(
                    f"sasl.mechanism.inter.broker.protocol {mechanism} is not in "
                    "sasl.enabled.mechanisms"
                )
            if not security.username:
                raise InvalidConfigError(
                    f"the inter-broker listener is {protocol.value}: set "
                    "STREAMBUS_INTER_BROKER_SASL_USERNAME"
                )
            if (security.password is None) == (security.password_file is None):
                raise InvalidConfigError(
                    "give the inter-broker password one way: STREAMBUS_INTER_BROKER_SASL_PASSWORD "
                    "or STREAMBUS_INTER_BROKER_SASL_PASSWORD_FILE"
                )
            try:
                security.secret()
            except OSError as exc:
                raise InvalidConfigError(f"inter-broker password file: {exc}") from exc
        if protocol.tls:
            algorithm = config.ssl_endpoint_identification_algorithm.strip().lower()
            if algorithm not in ("https", ""):
                raise InvalidConfigError(
                    f"ssl.endpoint.identification.algorithm is 'https' or empty, not {algorithm!r}"
                )
            context = ClientTls(
                config.ssl_cafile,
                config.ssl_certfile,
                config.ssl_keyfile,
                present_certificate=config.ssl_client_auth.lower() == ClientAuth.REQUIRED,
                check_hostname=algorithm == "https",
            )
            security = dataclasses.replace(security, tls=context)
        return security

    @property
    def principal(self) -> str:
        return "User:" + self.username if self.protocol.sasl else "(certificate or ANONYMOUS)"

    def secret(self) -> str:
        """The password: the file's first line (read now), else the configured one."""
        if self.password_file is not None:
            lines = self.password_file.read_text().splitlines()
            return lines[0] if lines else ""
        return self.password or ""


class BrokerConnection:
    """One connection to another broker: framed requests, one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._correlation = 0
        self.expires_at: float | None = None  # monotonic; the server's session lifetime

    @property
    def expiring(self) -> bool:
        """The server's session ends soon: dial again rather than send on this one."""
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    @property
    def closed(self) -> bool:
        """The peer hung up (or this side closed): a kept connection not to send on."""
        return self._reader.at_eof() or self._writer.is_closing()

    async def request(self, request: Any, response_cls: Any, version: int, client_id: str) -> Any:
        self._correlation += 1
        request.with_header(correlation_id=self._correlation, client_id=client_id)
        self._writer.write(bytes(request.encode(version=version, header=True, framed=True)))
        await self._writer.drain()
        size = int.from_bytes(await self._reader.readexactly(4), "big", signed=True)
        frame = await self._reader.readexactly(size)
        if size > DECODE_IN_THREAD_OVER:
            return await asyncio.to_thread(response_cls.decode, frame, version=version, header=True)
        return response_cls.decode(frame, version=version, header=True)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


class BrokerDialer:
    """Opens authenticated connections to other brokers; one per broker process, shared by
    the replica fetchers and the marker writer."""

    def __init__(self, security: InterBrokerSecurity | None = None) -> None:
        self.security = security or InterBrokerSecurity()
        self._failing: dict[int, str] = {}  # broker id -> the reason last logged

    async def connect(
        self, broker_id: int, host: str, port: int, *, client_id: str, timeout_s: float
    ) -> BrokerConnection:
        """A connection to ``broker_id`` at ``host:port``, TLS and SASL done. Raises OSError
        and TimeoutError (unreachable), ssl.SSLError or SaslAuthenticationFailedError
        (refused: logged here)."""
        security = self.security
        try:
            async with asyncio.timeout(timeout_s):
                tls = await security.tls.current() if security.tls is not None else None
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls is not None else None
                )
                conn = BrokerConnection(reader, writer)
                try:
                    if security.protocol.sasl:
                        await self._authenticate(conn, broker_id, host, port, client_id)
                except BaseException:
                    await conn.close()
                    raise
        except AUTHENTICATION_FAILURES as exc:
            self._refused(broker_id, host, port, exc)
            raise
        if self._failing.pop(broker_id, None) is not None:
            log.info(
                "inter-broker connection to broker %d (%s:%d, %s) authenticated again",
                broker_id,
                host,
                port,
                security.protocol.value,
            )
        return conn

    def _refused(self, broker_id: int, host: str, port: int, exc: BaseException) -> None:
        security = self.security
        if isinstance(exc, ssl.SSLError):
            what = f"TLS handshake failed: {getattr(exc, 'verify_message', None) or exc}"
        else:
            what = str(exc)
        line = (
            "inter-broker authentication to broker %d (%s:%d, %s%s) failed: %s; "
            "retrying with backoff"
        )
        mechanism = (
            f" {security.mechanism} as {security.principal}" if security.protocol.sasl else ""
        )
        args = (broker_id, host, port, security.protocol.value, mechanism, what)
        if self._failing.get(broker_id) != what:
            self._failing[broker_id] = what
            log.warning(line, *args)
        else:
            log.debug(line, *args)

    async def _authenticate(
        self, conn: BrokerConnection, broker_id: int, host: str, port: int, client_id: str
    ) -> None:
        security = self.security
        mechanism = security.mechanism

        def refused(code: int, message: str | None) -> SaslAuthenticationFailedError:
            return SaslAuthenticationFailedError(
                f"{error_name(code)} ({code}): {message or 'no message'}"
            )

        handshake = await conn.request(
            SaslHandshakeRequest(mechanism=mechanism),
            SaslHandshakeResponse,
            HANDSHAKE_VERSION,
            client_id,
        )
        if handshake.error_code:
            raise refused(
                handshake.error_code, f"the broker offers {', '.join(handshake.mechanisms)}"
            )

        async def step(token: bytes) -> bytes:
            response = await conn.request(
                SaslAuthenticateRequest(auth_bytes=token),
                SaslAuthenticateResponse,
                AUTHENTICATE_VERSION,
                client_id,
            )
            if response.error_code:
                raise refused(response.error_code, response.error_message)
            if response.session_lifetime_ms > 0:
                conn.expires_at = (
                    time.monotonic() + response.session_lifetime_ms / 1000 - REAUTH_MARGIN_S
                )
            return bytes(response.auth_bytes or b"")

        try:
            password = await asyncio.to_thread(security.secret)
        except OSError as exc:
            raise SaslAuthenticationFailedError(f"cannot read the password file: {exc}") from None
        if mechanism == PLAIN:
            await step(b"\0" + security.username.encode() + b"\0" + password.encode())
            return
        client = ScramClient([mechanism], security.username, password)
        try:
            server_first = await step(client.get_client_first().encode())
            # the salted password (PBKDF2, 4096+ iterations) is derived here: off the loop
            await asyncio.to_thread(client.set_server_first, server_first.decode())
            server_final = await step(client.get_client_final().encode())
            client.set_server_final(server_final.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise SaslAuthenticationFailedError(
                f"the SCRAM exchange failed on this side: {exc}"
            ) from None
