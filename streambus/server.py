"""The asyncio TCP server: length-prefixed Kafka frames, one handler object per connection.

Requests on one connection are served one at a time, in order, as Kafka does
(it mutes a channel until the response is sent): clients match responses by
correlation id but expect them in request order. Anything that cannot be
parsed closes that connection only, with a log line naming the peer and the
reason; every other connection keeps being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streambus.errors import StreamBusError, UnsupportedVersionError
from streambus.protocol.apis import (
    APIS,
    FRAME_SIZE,
    REQUEST_PREFIX,
    Chunk,
    RequestContext,
    encode_frame,
    encode_response,
)
from streambus.protocol.metadata import api_versions_response
from streambus.protocol.validation import check_request

if TYPE_CHECKING:
    from streambus.broker import Broker

log = logging.getLogger("streambus.server")


class ConnectionClosedError(Exception):
    """This connection is finished (peer closed, or it sent something unparseable)."""


class KafkaServer:
    def __init__(self, broker: Broker, host: str, port: int, max_request_bytes: int) -> None:
        self._broker = broker
        self._host = host
        self._port = port
        self._max_request_bytes = max_request_bytes
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self.active_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connect, self._host, self._port, reuse_address=True
        )
        log.info("listening for Kafka clients on %s:%d", self._host, self.port)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
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
        self._server.close()
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
        await self._server.wait_closed()
        self._server = None

    @property
    def broker(self) -> Broker:
        return self._broker

    @property
    def max_request_bytes(self) -> int:
        return self._max_request_bytes


class Connection:
    def __init__(
        self, server: KafkaServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._stopping = False
        self._busy = False

    def stop_reading(self) -> None:
        """Finish the request in hand, read no more; an idle connection closes now."""
        self._stopping = True
        if not self._busy:
            self.close()

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    async def serve(self) -> None:
        try:
            while not self._stopping:
                frame = await self._read_frame()
                self._busy = True
                try:
                    await self._handle(frame)
                finally:
                    self._busy = False
        except ConnectionClosedError:
            pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away, mid-frame or between frames
        finally:
            self.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def _read_frame(self) -> bytes:
        head = await self._reader.readexactly(4)
        (size,) = FRAME_SIZE.unpack(head)
        if size < REQUEST_PREFIX.size or size > self._server.max_request_bytes:
            self._reject(
                f"frame size {size} outside [{REQUEST_PREFIX.size}, "
                f"{self._server.max_request_bytes}] (socket.request.max.bytes)"
            )
        return await self._reader.readexactly(size)

    def _reject(self, reason: str, api: str = "unknown") -> None:
        log.warning("closing connection from %s: %s", self.peer, reason)
        self._server.broker.telemetry.error(api, "INVALID_REQUEST")
        raise ConnectionClosedError(reason)

    async def _handle(self, frame: bytes) -> None:
        api_key, version, correlation_id = REQUEST_PREFIX.unpack_from(frame)
        spec = APIS.get(api_key)
        if spec is None:
            self._reject(f"unknown API key {api_key} (correlation id {correlation_id})")
            return
        if not spec.supports(version):
            if spec.name == "ApiVersions":
                # Kafka's rule for version negotiation: answer a too-new
                # ApiVersions with error 35 in a v0 body listing what we serve.
                response = api_versions_response(UnsupportedVersionError.errno)
                await self._send(
                    [encode_response(response, 0, correlation_id)], spec.name, len(frame)
                )
                return
            self._reject(
                f"{spec.name} v{version} not supported (serving v{spec.min_version}"
                f"-v{spec.max_version})",
                spec.name,
            )
        try:
            request = spec.request.decode(frame, version=version, header=True)
        except Exception as exc:  # kafka-python raises assorted errors on truncated input
            self._reject(f"malformed {spec.name} v{version} request: {exc!r}", spec.name)
            return
        header = request.header
        refusal = check_request(spec.request, spec.response, request, version)
        if refusal is not None:
            reason = f"{spec.name} v{version} from client {header.client_id!r}: {refusal.reason}"
            if refusal.response is None:
                self._reject(reason, spec.name)
            log.warning("answering INVALID_REQUEST to %s: %s", self.peer, reason)
            self._server.broker.telemetry.error(spec.name, "INVALID_REQUEST")
            reply = encode_response(refusal.response, version, correlation_id)
            await self._send([reply], spec.name, len(frame))
            return
        ctx = _ctx(spec.key, version, correlation_id, header.client_id, self.peer)
        server = self._server
        server.request_started()
        try:
            response = await spec.handler(server.broker, ctx, request)
            chunks: Sequence[Chunk] = (
                () if response is None else encode_frame(spec, response, version, correlation_id)
            )
        except StreamBusError as exc:
            log.warning("%s from %s failed: %s", spec.name, self.peer, exc)
            server.broker.telemetry.error(spec.name, exc.kafka_name)
            raise ConnectionClosedError(str(exc)) from exc
        except Exception:
            log.exception(
                "%s from %s failed unexpectedly; closing the connection", spec.name, self.peer
            )
            server.broker.telemetry.error(spec.name, "UNKNOWN_SERVER_ERROR")
            raise ConnectionClosedError("handler failed") from None
        finally:
            server.request_finished()
        await self._send(chunks, spec.name, len(frame))

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
        except StreamBusError as exc:  # the log changed under a response half written
            log.warning("closing connection from %s: %s response failed: %s", self.peer, api, exc)
            self._server.broker.telemetry.error(api, exc.kafka_name)
            raise ConnectionClosedError(str(exc)) from exc
        if size:
            await writer.drain()
        self._server.broker.telemetry.request_done(api, bytes_in + 4, size)


def _ctx(
    key: int, version: int, correlation_id: int, client_id: str | None, peer: str
) -> RequestContext:
    return RequestContext(key, version, correlation_id, client_id, peer)
