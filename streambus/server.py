"""The asyncio TCP server: length-prefixed Kafka frames, one handler object per connection.

Requests on one connection are served one at a time, in order, as Kafka does
(it mutes a channel until the response is sent): clients match responses by
correlation id but expect them in request order. Anything that cannot be
parsed closes that connection only, with a log line naming the peer and the
reason; every other connection keeps being served.

What a client can hold is bounded, the way Kafka bounds it:

* ``max.connections`` and ``max.connections.per.ip``: a connection over a
  limit is accepted and closed at once (counted, logged rate-limited), so a
  flood never drives the process to its open-file limit, where ``accept()``
  itself fails and ``/metrics`` and log segments could not open either.
* ``queued.max.request.bytes``: a frame's size is reserved from one
  broker-wide pool before its body is read, and the body is read in bounded
  pieces; a connection whose frame does not fit is simply not read until
  memory is released (backpressure).
* ``connections.max.idle.ms``: a connection that neither sends a request nor
  takes response bytes for that long is closed, stalled half-frames included.
  A request being handled (a long poll) is not idleness.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import resource
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from streambus.errors import StreamBusError, UnsupportedVersionError
from streambus.protocol.apis import (
    FRAME_SIZE,
    REQUEST_PREFIX,
    ApiSpec,
    ApiTable,
    Chunk,
    ConnectionClosedError,
    RequestContext,
    api_versions_response,
    encode_frame,
    encode_response,
)
from streambus.protocol.validation import Refusal, check_request
from streambus.security.listeners import Listener
from streambus.security.readiness import WAIT_S as SECURITY_WAIT_S
from streambus.security.sasl import PRE_AUTH_APIS, SASL_AUTHENTICATE, SaslSession
from streambus.security.tls import ANONYMOUS, file_stamps, principal_from_cert, server_context
from streambus.storage.datadir import FD_RESERVE, connection_fd_budget

if TYPE_CHECKING:
    from streambus.config import BrokerConfig
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.server")

ACCEPT_BACKLOG = 100
# Frame bodies are read in pieces this large: the stream's own buffer never grows past
# about two pieces, whatever size the frame announces.
READ_PIECE = 64 * 1024
# Requests in frames larger than this are decoded, checked and answered in a worker thread.
LARGE_FRAME = 256 * 1024
# One log line per cause at most this often; the lines in between are counted.
LOG_EVERY_S = 5.0
# How often idle connections are looked for and the loop's lateness is measured.
TICK_MAX_S = 0.5
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# A TLS client that has not finished its handshake by then is closed.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# How often the certificate, key and CA files are looked at for a change (one stat each).
TLS_RELOAD_CHECK_S = 5.0


class Phase:
    """Where a connection is; only READING and WRITING can be idle."""

    READING = "reading"  # waiting for, or in the middle of, a request frame
    QUEUED = "queued"  # a frame header read; waiting for request memory (not read meanwhile)
    HANDLING = "handling"  # the handler runs (a long poll may wait here)
    WRITING = "writing"  # the response is being handed to a client that may not read
    MUTED = "muted"  # over a quota: not read until its throttle time has passed


class ThrottledLog:
    """At most one line per key every ``every_s``; the suppressed ones are counted into the
    next line (or into :meth:`flush`'s summary), so a flood costs a few lines, not gigabytes."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, int, str]] = {}  # key -> count, level, summary text

    def log(self, key: str, level: int, summary: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is None or now - last >= self._every:
            held, _, _ = self._held.pop(key, (0, level, summary))
            self._last[key] = now
            if held:
                self._log.log(
                    level, msg + " (and %d more %s since the last line)", *args, held, summary
                )
            else:
                self._log.log(level, msg, *args)
        else:
            count, _, _ = self._held.get(key, (0, level, summary))
            self._held[key] = (count + 1, level, summary)

    def flush(self) -> None:
        """Report counts held back for longer than the interval (the flood has stopped)."""
        now = time.monotonic()
        for key, (count, level, summary) in list(self._held.items()):
            if now - self._last.get(key, 0.0) >= self._every:
                del self._held[key]
                self._last[key] = now
                self._log.log(level, "%d more %s since the last line", count, summary)


class RequestMemory:
    """Kafka's ``queued.max.request.bytes``: a byte budget shared by every connection.

    A frame reserves its size before its body is read and gives it back once its
    response is written. Waiters are served first-fit in arrival order: a small
    request is not held behind a large one that does not fit yet.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def reserve(self, size: int, gone: asyncio.Future[None]) -> None:
        """Reserve ``size`` bytes; raise ConnectionClosedError if ``gone`` completes first."""
        if not self._waiters and self.used + size <= self.capacity:
            self.used += size
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait((granted, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not granted.done():
                self._waiters.remove(entry)
                granted.cancel()
        if not granted.done() or granted.cancelled():
            raise ConnectionClosedError("closed while waiting for request memory")

    def release(self, size: int) -> None:
        self.used -= size
        for entry in list(self._waiters):
            want, granted = entry
            if self.used + want <= self.capacity:
                self._waiters.remove(entry)
                self.used += want
                granted.set_result(None)


def connection_limit(config: BrokerConfig) -> tuple[int, int]:
    """(max.connections, max.connections.per.ip) with the automatic values resolved."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = config.max_connections or connection_fd_budget()
    if config.max_connections > soft - FD_RESERVE:
        log.warning(
            "max.connections=%d leaves fewer than %d of the %d open files allowed "
            "(ulimit -n) for the listener, /metrics and log segments",
            config.max_connections,
            FD_RESERVE,
            soft,
        )
    per_ip = min(config.max_connections_per_ip or limit, limit)
    return limit, per_ip


class KafkaServer:
    def __init__(self, services: BrokerServices, config: BrokerConfig, apis: ApiTable) -> None:
        self._services = services
        self.apis = apis
        self._config = config
        self.listeners = config.listener_list()
        self.inter_broker = config.inter_broker_listener()
        self.mechanisms = config.sasl_mechanisms()
        self.oauth = config.oauthbearer_validator()  # one JWKS cache for every connection
        self.tls: ssl.SSLContext | None = None
        self._tls_files = [
            p for p in (config.ssl_certfile, config.ssl_keyfile, config.ssl_cafile) if p
        ]
        self._tls_stamp = file_stamps(self._tls_files)
        self._tls_checked = 0.0
        if any(x.protocol.tls for x in self.listeners):
            self.tls = self._tls_context()
        self._max_request_bytes = config.max_request_bytes
        self.memory = RequestMemory(config.queued_max_request_bytes)
        self._idle_s = config.connections_max_idle_ms / 1000
        self.max_connections, self.max_connections_per_ip = 0, 0
        self._server: asyncio.Server | None = None  # the inter-broker listener's
        self._servers: dict[str, asyncio.Server] = {}
        self._accepting = False
        self.connections: set[Connection] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        # Connections over their ip's creation rate, held unread until their close is due.
        self._held: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._open = 0  # admitted transports, counted as they are made (before their task runs)
        self.active_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        self._throttled = ThrottledLog(log)
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None

    @property
    def port(self) -> int:
        """The bound port of the inter-broker listener (the first one by default)."""
        return self.listener_port(self.inter_broker.name)

    def listener_port(self, name: str) -> int:
        server = self._servers.get(name)
        if server is None or not server.sockets:
            raise RuntimeError(f"listener {name} is not listening")
        return int(server.sockets[0].getsockname()[1])

    def advertised(self, name: str) -> tuple[str, int]:
        """Where clients reach listener ``name`` (its advertised host and port)."""
        for listener in self.listeners:
            if listener.name == name:
                return listener.advertised_host, (
                    listener.advertised_port or self.listener_port(name)
                )
        raise KeyError(name)

    async def start(self) -> None:
        self.max_connections, self.max_connections_per_ip = connection_limit(self._config)
        loop = self._loop = asyncio.get_running_loop()
        self._accepting = True
        try:
            for listener in self.listeners:
                self._servers[listener.name] = await loop.create_server(
                    lambda listener=listener: _KafkaProtocol(self, listener),  # type: ignore[misc]
                    listener.host,
                    listener.port,
                    reuse_address=True,
                    backlog=ACCEPT_BACKLOG,
                )
        except BaseException:
            for server in self._servers.values():
                server.close()
            self._servers.clear()
            raise
        self._server = self._servers[self.inter_broker.name]
        # asyncio reports a failed accept() (EMFILE) through the loop's exception handler,
        # once per attempt: routed through a throttled line instead of a traceback each.
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        self._ticker = asyncio.create_task(self._tick(), name="streambus-connections")
        if self.oauth is not None:
            self.oauth.jwks.prefetch()  # the JWKS in hand before the first login
        log.info(
            "listening for Kafka clients on %s (max.connections %d, per ip %d, "
            "connections.max.idle.ms %d, queued.max.request.bytes %d)",
            ", ".join(f"{x.name}://{x.host}:{self.listener_port(x.name)}" for x in self.listeners),
            self.max_connections,
            self.max_connections_per_ip,
            self._config.connections_max_idle_ms,
            self.memory.capacity,
        )

    # -- TLS certificates, reloaded when their files change ---------------------------------
    def _tls_context(self) -> ssl.SSLContext:
        c = self._config
        return server_context(c.ssl_certfile, c.ssl_keyfile, c.ssl_cafile, c.ssl_client_auth)

    def _reload_tls(self) -> None:
        """New connections get renewed certificates without a restart; open ones keep
        theirs. A file caught half-written (or a key not matching its certificate) keeps
        the old context and is tried again at the next change."""
        stamp = file_stamps(self._tls_files)
        if stamp == self._tls_stamp:
            return
        self._tls_stamp = stamp
        try:
            self.tls = self._tls_context()
        except StreamBusError as exc:
            log.error("TLS certificates changed but not reloaded (the old ones stay): %s", exc)
            return
        log.info("TLS certificates reloaded from %s", ", ".join(map(str, self._tls_files)))

    # -- admission ------------------------------------------------------------------------
    def admit(self, ip: str, peer: str) -> bool:
        """Count a new transport in, or refuse it (the caller closes it at once)."""
        if not self._accepting:
            reason = "stopping"
        elif self._open >= self.max_connections:
            reason = "max_connections"
        elif self._per_ip[ip] >= self.max_connections_per_ip:
            reason = "max_connections_per_ip"
        else:
            self._open += 1
            self._per_ip[ip] += 1
            self._all_gone.clear()
            return True
        self._services.telemetry.connection_rejected(reason)
        limit = self.max_connections if reason == "max_connections" else self.max_connections_per_ip
        self._throttled.log(
            reason,
            logging.WARNING,
            "connections refused for " + reason.replace("_", "."),
            "refused connection from %s: %s=%d reached",
            peer,
            reason.replace("_", "."),
            limit,
        )
        return False

    def hold_if_throttled(self, ip: str, peer: str, transport: asyncio.BaseTransport) -> bool:
        """KIP-612: a connection taking ``ip`` over its ``connection_creation_rate`` is held
        unread for its throttle time, then closed unanswered, as Kafka's acceptor does (a
        delayed close, so a reconnecting client backs off). It stays counted against
        max.connections meanwhile, which bounds the sockets held; nothing waits on the loop.
        The broker-wide max.connection.creation.rate is checked first, the same way."""
        quotas = self._services.quotas
        reason, why = "max_connection_creation_rate", "the broker's max.connection.creation.rate"
        delay = quotas.broker_connection_throttle(self._config.max_connection_creation_rate)
        if not delay:
            reason, why = "connection_creation_rate", "its ip's connection_creation_rate quota"
            delay = quotas.connection_throttle(ip)
        if not delay:
            return False
        self._services.telemetry.connection_rejected(reason)
        self._throttled.log(
            reason,
            logging.WARNING,
            "connections closed for " + reason,
            "closing connection from %s unanswered in %d ms: over %s",
            peer,
            round(delay * 1000),
            why,
        )
        transport.pause_reading()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        self._held[transport] = loop.call_later(delay, self._close_held, transport)
        return True

    def _close_held(self, transport: asyncio.BaseTransport) -> None:
        self._held.pop(transport, None)
        transport.close()

    def release(self, ip: str) -> None:
        self._open -= 1
        self._per_ip[ip] -= 1
        if not self._per_ip[ip]:
            del self._per_ip[ip]
        if not self._open:
            self._all_gone.set()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_DESCRIPTORS:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            self._throttled.log(
                "accept",
                logging.ERROR,
                "failed accepts",
                "cannot accept connections: %s (%d connections open, open-file limit %d); "
                "asyncio retries in a second",
                exc,
                self._open,
                soft,
            )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # -- connections that end -------------------------------------------------------------
    async def _tick(self) -> None:
        """Close idle connections and measure how late the loop wakes (its stalls)."""
        loop = asyncio.get_running_loop()
        interval = (
            TICK_MAX_S if self._idle_s <= 0 else min(TICK_MAX_S, max(self._idle_s / 10, 0.01))
        )
        telemetry = self._services.telemetry
        while True:
            planned = loop.time() + interval
            await asyncio.sleep(interval)
            now = loop.time()
            telemetry.event_loop_lag(max(now - planned, 0.0))
            if self._idle_s > 0:
                self._close_idle(now)
            self._throttled.flush()
            if self.tls is not None and now >= self._tls_checked + TLS_RELOAD_CHECK_S:
                self._tls_checked = now
                self._reload_tls()

    def _close_idle(self, now: float) -> None:
        closed = 0
        for conn in list(self.connections):
            if conn.idle_since(now) > self._idle_s:
                log.debug(
                    "closing connection from %s: idle (%s) for more than %d ms",
                    conn.peer,
                    conn.phase,
                    self._config.connections_max_idle_ms,
                )
                conn.abort()
                closed += 1
        if closed:
            self._services.telemetry.connections_idle_closed(closed)
            self._throttled.log(
                "idle",
                logging.INFO,
                "sweeps closing idle connections",
                "closed %d connections idle for more than %d ms (connections.max.idle.ms)",
                closed,
                self._config.connections_max_idle_ms,
            )

    async def _serve(self, conn: Connection) -> None:
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def request_started(self) -> None:
        self.active_requests += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self._idle.set()

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then close every connection."""
        if self._server is None:
            return
        self._server = None
        servers, self._servers = list(self._servers.values()), {}
        if self.oauth is not None:
            await self.oauth.jwks.close()
        self._accepting = False
        for server in servers:
            server.close()
        for transport, due in list(self._held.items()):
            due.cancel()
            self._close_held(transport)
        for conn in list(self.connections):
            conn.stop_reading()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning(
                "%d requests still running after %.1fs; closing anyway",
                self.active_requests,
                timeout_s,
            )
        for conn in list(self.connections):
            conn.close()
        try:
            # Closed transports report connection_lost on the next loop turns; a client
            # that never takes its last response is cut off after the grace period.
            await asyncio.wait_for(self._all_gone.wait(), 1.0)
        except TimeoutError:
            for conn in list(self.connections):
                conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for server in servers:
            await server.wait_closed()
        if self._loop is not None and self._loop.get_exception_handler() == self._on_loop_error:
            self._loop.set_exception_handler(self._previous_handler)

    @property
    def services(self) -> BrokerServices:
        return self._services

    @property
    def config(self) -> BrokerConfig:
        return self._config

    def auth_warning(self, msg: str, *args: object) -> None:
        """One WARNING per failed authentication, at most one line every few seconds
        (the rest counted into the next line): a brute-forcer cannot flood the log."""
        self._throttled.log("authentication", logging.WARNING, "failed authentications", msg, *args)

    def not_ready_warning(self, msg: str, *args: object) -> None:
        """Connections closed while the ACLs and credentials load: a few lines, not one each."""
        self._throttled.log(
            "security_not_ready", logging.WARNING, "connections closed before loading", msg, *args
        )

    @property
    def max_request_bytes(self) -> int:
        return self._max_request_bytes


class _KafkaProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, plus admission and a future that completes when the
    client goes (EOF or a lost connection) even while no read is pending."""

    def __init__(self, server: KafkaServer, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        self._kafka = server
        self._listener = listener
        self._ip: str | None = None
        self.gone: asyncio.Future[None] = loop.create_future()
        super().__init__(asyncio.StreamReader(loop=loop), self._connected, loop=loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        label = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._kafka.admit(ip, label):
            self._mark_gone()
            transport.close()  # nothing written yet: closes the socket now
            return
        self._ip = ip
        if self._kafka.hold_if_throttled(ip, label, transport):
            return  # counted until closed (connection_lost releases it)
        if self._listener.protocol.tls:
            # Nothing may be read before the TLS layer is in place: the ClientHello would
            # land in the stream buffer instead (start_tls resumes reading).
            transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)

    def _connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None]:
        return self._kafka._serve(
            Connection(self._kafka, reader, writer, self.gone, self._listener)
        )

    def eof_received(self) -> bool | None:
        self._mark_gone()  # Kafka clients do not half-close: EOF means the client left
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_gone()
        if self._ip is not None:
            self._kafka.release(self._ip)
            self._ip = None
        super().connection_lost(exc)

    def _mark_gone(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


class Connection:
    def __init__(
        self,
        server: KafkaServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gone: asyncio.Future[None] | None = None,
        listener: Listener | None = None,
    ) -> None:
        self._server = server
        self.listener = listener if listener is not None else server.listeners[0]
        self.principal = ANONYMOUS
        self.session: SaslSession | None = None
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.gone: asyncio.Future[None] = (
            gone if gone is not None else asyncio.get_running_loop().create_future()
        )
        self._stopping = False
        self.phase = Phase.READING
        self._clock: Callable[[], float] = asyncio.get_running_loop().time
        self._last_progress = self._clock()
        self._seen_write_buffer = 0
        self._reserved = 0

    def idle_since(self, now: float) -> float:
        """Seconds since this connection last moved bytes; 0 while its request is handled."""
        if self.phase in (Phase.HANDLING, Phase.QUEUED, Phase.MUTED):
            return 0.0
        if self.phase == Phase.WRITING:
            # Progress is the transport's buffer changing as the client takes bytes.
            size = self._writer.transport.get_write_buffer_size()
            if size != self._seen_write_buffer:
                self._seen_write_buffer = size
                self._last_progress = now
        return now - self._last_progress

    def stop_reading(self) -> None:
        """Finish the request in hand, read no more; an idle connection closes now."""
        self._stopping = True
        if self.phase in (Phase.READING, Phase.QUEUED, Phase.MUTED):
            self.close()

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    def abort(self) -> None:
        """Close without flushing: for a client that stopped taking what was written."""
        self._writer.transport.abort()

    async def _secure(self) -> None:
        """TLS handshake (TLS listeners) and the SASL session (SASL listeners)."""
        listener = self.listener
        server = self._server
        if listener.protocol.tls and server.tls is not None:
            try:
                await self._writer.start_tls(
                    server.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                if server.config.ssl_client_auth.lower() == "required":
                    # a refused client certificate is a failed authentication
                    server.services.authorizer.audit.authentication(
                        ANONYMOUS, "SSL", listener.name, self.peer, False, str(reason)[:64]
                    )
                log.warning(
                    "closing connection from %s on listener %s: TLS handshake failed (%s)",
                    self.peer,
                    listener.name,
                    reason,
                )
                raise ConnectionClosedError("TLS handshake failed") from None
            peercert = self._writer.get_extra_info("peercert")
            self.principal = principal_from_cert(peercert)
            if not listener.protocol.sasl and peercert:
                server.services.telemetry.authentication("SSL", listener.name, None)
                server.services.authorizer.audit.authentication(
                    self.principal, "SSL", listener.name, self.peer, True
                )
        if listener.protocol.sasl:
            config = server.config
            self.session = SaslSession(
                server.services.credentials,
                server.mechanisms,
                listener.name,
                server.services.telemetry,
                peer=self.peer,
                failure_delay_ms=config.connection_failed_authentication_delay_ms,
                reauth_ms=config.connections_max_reauth_ms,
                warn=server.auth_warning,
                audit=server.services.authorizer.audit,
                oauth=server.oauth,
            )

    async def serve(self) -> None:
        try:
            await self._secure()
            while not self._stopping:
                frame = await self._read_frame()
                session = self.session
                if session is not None and session.raw_tokens:
                    await self._raw_token(session, frame)
                    self._release()
                    continue
                self.phase = Phase.HANDLING
                try:
                    await self._handle(frame)
                finally:
                    del frame
                    self._release()
                    self.phase = Phase.READING
                    self._last_progress = self._clock()
        except ConnectionClosedError:
            pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away, mid-frame or between frames
        except ssl.SSLError as exc:
            # A TLS record that breaks the protocol after the handshake (data after
            # close_notify, a bad MAC): the client's fault or a close racing a shutdown.
            if not self._stopping:
                log.warning("closing TLS connection from %s: %s", self.peer, exc.reason or exc)
        finally:
            self._release()
            self.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    def _release(self) -> None:
        if self._reserved:
            self._server.memory.release(self._reserved)
            self._reserved = 0

    async def _read_frame(self) -> bytes | bytearray:
        head = await self._reader.readexactly(4)
        self._last_progress = self._clock()
        (size,) = FRAME_SIZE.unpack(head)
        if size < REQUEST_PREFIX.size or size > self._server.max_request_bytes:
            self._reject(
                f"frame size {size} outside [{REQUEST_PREFIX.size}, "
                f"{self._server.max_request_bytes}] (socket.request.max.bytes)"
            )
        self.phase = Phase.QUEUED
        await self._server.memory.reserve(size, self.gone)
        self._reserved = size
        self.phase = Phase.READING
        self._last_progress = self._clock()
        if size <= READ_PIECE:
            return await self._reader.readexactly(size)
        # In pieces: the stream buffers one piece at a time, and a client that stops
        # mid-frame holds only what it sent (within its reservation) until the idle timeout.
        frame = bytearray()
        while len(frame) < size:
            piece = await self._reader.read(min(READ_PIECE, size - len(frame)))
            if not piece:
                raise asyncio.IncompleteReadError(bytes(frame), size)
            frame += piece
            self._last_progress = self._clock()
        return frame

    def _needs_security_state(self, api_key: int) -> bool:
        """A SASL token is checked against the credentials, and with the authorizer on every
        request but the pre-authentication ones is authorized."""
        services = self._server.services
        if services.authorizer.state.loaded:
            return False
        if api_key == SASL_AUTHENTICATE:
            return self.session is not None
        return api_key not in PRE_AUTH_APIS and services.authorizer.enabled

    async def _await_security_state(self, api: str) -> None:
        """Hold the request until the ACLs and credentials are loaded (security/readiness.py);
        still not at the bound: close the connection, which the client retries."""
        if await self._server.services.authorizer.state.wait(SECURITY_WAIT_S):
            return
        self._server.not_ready_warning(
            "closing connection from %s: %s waited %.0f s for this broker's ACLs and "
            "credentials to load (the client reconnects)",
            self.peer,
            api,
            SECURITY_WAIT_S,
        )
        raise ConnectionClosedError("ACLs and credentials not loaded")

    async def _raw_token(self, session: SaslSession, frame: bytes | bytearray) -> None:
        """A bare SASL token after a SaslHandshake v0: answered with a bare token; a
        failure cannot be answered in this form, so the connection closes."""
        if self._needs_security_state(SASL_AUTHENTICATE):
            await self._await_security_state("SaslAuthenticate")
        try:
            reply = await session.authenticate(bytes(frame))
        except StreamBusError as exc:
            raise ConnectionClosedError(exc.message) from None
        self._writer.write(FRAME_SIZE.pack(len(reply)) + reply)
        await self._writer.drain()

    def _reject(self, reason: str, api: str = "unknown") -> None:
        log.warning("closing connection from %s: %s", self.peer, reason)
        self._server.services.telemetry.error(api, "INVALID_REQUEST")
        raise ConnectionClosedError(reason)

    async def _handle(self, frame: bytes | bytearray) -> None:
        api_key, version, correlation_id = REQUEST_PREFIX.unpack_from(frame)
        apis = self._server.apis
        spec = apis.get(api_key)
        if spec is None:
            self._reject(f"unknown API key {api_key} (correlation id {correlation_id})")
            return
        if not spec.supports(version):
            if spec.name == "ApiVersions":
                # Kafka's rule for version negotiation: answer a too-new
                # ApiVersions with error 35 in a v0 body listing what we serve.
                response = api_versions_response(apis, UnsupportedVersionError.errno)
                await self._write(
                    [encode_response(response, 0, correlation_id)], spec.name, len(frame)
                )
                return
            self._reject(
                f"{spec.name} v{version} not supported (serving v{spec.min_version}"
                f"-v{spec.max_version})",
                spec.name,
            )
        # A frame naming 100,000 partitions takes seconds of pure Python to decode, check and
        # answer: large frames do that in a worker thread, which hands the loop the
        # interpreter every few milliseconds instead of holding every other client.
        large = len(frame) > LARGE_FRAME
        parsed = await asyncio.to_thread(_parse, spec, frame, version) if large else None
        if parsed is None:
            parsed = _parse(spec, frame, version)
        if isinstance(parsed, Exception):  # kafka-python raises assorted errors on bad input
            self._reject(f"malformed {spec.name} v{version} request: {parsed!r}", spec.name)
            return
        request, refusal = parsed
        header = request.header
        if refusal is not None:
            reason = f"{spec.name} v{version} from client {header.client_id!r}: {refusal.reason}"
            if refusal.response is None:
                self._reject(reason, spec.name)
            log.warning("answering INVALID_REQUEST to %s: %s", self.peer, reason)
            self._server.services.telemetry.error(spec.name, "INVALID_REQUEST")
            reply = encode_response(refusal.response, version, correlation_id)
            await self._write([reply], spec.name, len(frame))
            return
        session = self.session
        if session is not None and spec.key not in PRE_AUTH_APIS:
            if not session.authenticated:
                self._reject(
                    f"{spec.name} before SASL authentication on listener {self.listener.name}",
                    spec.name,
                )
            if session.expired:
                log.info(
                    "closing connection from %s: its SASL session expired without "
                    "re-authentication (lifetime %d ms: connections.max.reauth.ms %d, or "
                    "the token's expiry if sooner)",
                    self.peer,
                    session.session_lifetime_ms,
                    session.reauth_ms,
                )
                raise ConnectionClosedError("session expired")
        if self._needs_security_state(spec.key):
            await self._await_security_state(spec.name)
        ctx = RequestContext(
            spec.key,
            version,
            correlation_id,
            header.client_id,
            self.peer,
            principal=session.principal if session is not None else self.principal,
            listener=self.listener.name,
            closed=self.gone,
            apis=apis,
            session=session,
        )
        server = self._server
        # The frame was read (dispatched) when the read loop last stamped its progress.
        dispatched = self._last_progress
        quota = server.services.quotas.request_quota(
            ctx.principal, ctx.client_id, spec.key, request
        )
        server.request_started()
        try:
            handling = spec.handler(server.services, ctx, request)
            if quota is None:
                response = await handling
            else:
                response = await quota.timed(handling, self._clock)
                answered = self._clock()
                _throttle_request(ctx, response, quota.throttle(answered - dispatched))
            chunks: Sequence[Chunk] = ()
            if response is not None and large:
                chunks = await asyncio.to_thread(
                    encode_frame, spec, response, version, correlation_id
                )
            elif response is not None:
                chunks = encode_frame(spec, response, version, correlation_id)
            if quota is not None:
                quota.record(self._clock() - answered)  # encoding: Kafka's network thread time
        except ConnectionClosedError:
            raise  # the client left during a long poll: nobody to answer
        except StreamBusError as exc:
            log.warning("%s from %s failed: %s", spec.name, self.peer, exc)
            server.services.telemetry.error(spec.name, exc.kafka_name)
            raise ConnectionClosedError(str(exc)) from exc
        except Exception:
            log.exception(
                "%s from %s failed unexpectedly; closing the connection", spec.name, self.peer
            )
            server.services.telemetry.error(spec.name, "UNKNOWN_SERVER_ERROR")
            raise ConnectionClosedError("handler failed") from None
        finally:
            server.request_finished()
        throttle = ctx.throttle
        if throttle.ms > 0 and throttle.delay_response:
            await self._mute(throttle.ms)
        await self._write(chunks, spec.name, len(frame))
        if session is not None and session.failed:
            raise ConnectionClosedError("authentication failed")
        if throttle.ms > 0 and not throttle.delay_response:
            await self._mute(throttle.ms)

    async def _mute(self, ms: int) -> None:
        """Kafka's quota mute: no request of this connection is read for ``ms``, so a
        client over its quota waits it out whether or not it honours throttle_time_ms."""
        self.phase = Phase.MUTED
        done, _ = await asyncio.wait((self.gone,), timeout=ms / 1000)
        if done:
            raise ConnectionClosedError("client left while muted")

    async def _write(self, chunks: Sequence[Chunk], api: str, bytes_in: int) -> None:
        self.phase = Phase.WRITING
        self._last_progress = self._clock()
        self._seen_write_buffer = -1
        await self._send(chunks, api, bytes_in)

    async def _send(self, chunks: Sequence[Chunk], api: str, bytes_in: int) -> None:
        size = 0
        writer = self._writer
        try:
            for chunk in chunks:
                if isinstance(chunk, bytes | bytearray | memoryview):
                    # One write per piece: a transport sends what the socket takes at once
                    # without copying it first (writelines would join the pieces).
                    writer.write(chunk)
                    size += len(chunk)
                    continue
                # Stored records: read a bounded piece, hand it over, and read the next only
                # once the transport has drained, so a client that does not read holds
                # one piece, not the response.
                for piece in chunk.pieces():
                    writer.write(piece)
                    size += len(piece)
                    await writer.drain()
                    # drain() returns without yielding while the socket keeps taking bytes:
                    # yield anyway, so one large response does not hold every other client.
                    await asyncio.sleep(0)
        except StreamBusError as exc:  # the log changed under a response half written
            log.warning("closing connection from %s: %s response failed: %s", self.peer, api, exc)
            self._server.services.telemetry.error(api, exc.kafka_name)
            raise ConnectionClosedError(str(exc)) from exc
        if size:
            await writer.drain()
        self._server.services.telemetry.request_done(api, bytes_in + 4, size)


def _throttle_request(ctx: RequestContext, response: Any, ms: int) -> None:
    """A request quota's throttle: in the response (the larger of it and a byte-rate
    throttle the handler set) and on the connection. A response already encoded (a very
    large Produce answer) keeps its own figure; the mute applies all the same."""
    if ms <= ctx.throttle.ms:
        return
    ctx.throttle.ms = ms
    body = getattr(response, "response", response)  # a spliced Fetch wraps its response
    if hasattr(body, "throttle_time_ms"):
        body.throttle_time_ms = ms


def _parse(
    spec: ApiSpec, frame: bytes | bytearray, version: int
) -> tuple[Any, Refusal | None] | Exception:
    """The decoded request and its schema refusal, if any; the decoding error itself for a
    frame that does not parse (returned, not raised, so a worker thread can hand it back)."""
    try:
        request = spec.request.decode(frame, version=version, header=True)
    except Exception as exc:
        return exc
    return request, check_request(spec.request, spec.response, request, version)
