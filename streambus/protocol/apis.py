"""The dispatch table: one handler per Kafka API key, registered once.

Requests and responses are encoded and decoded with kafka-python's message
classes, which are generated from Kafka's own JSON message specs; StreamBus
writes no per-API structs. Each entry advertises the version range StreamBus
serves: wide enough for librdkafka, kafka-python, aiokafka and kcat to
negotiate, and capped below versions that need features StreamBus lacks (topic
ids in Fetch v13+, for one).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from streambus.broker import Broker

# Request header v0/v1/v2 all start with these fields; they are read before
# the full header so that an unknown API or version can still be answered.
#   api_key        int16  which API
#   api_version    int16  version of that API's request schema
#   correlation_id int32  echoed in the response so the client can match it
REQUEST_PREFIX = struct.Struct(">hhi")

# Response frames: size int32 (bytes that follow), then the response header.
FRAME_SIZE = struct.Struct(">i")


@dataclass(frozen=True, slots=True)
class RequestContext:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    peer: str
    # Completes when the client goes (EOF or lost connection): a handler that waits
    # (a long poll) stops waiting for a client that can no longer take the answer.
    closed: asyncio.Future[None] | None = None


Handler = Callable[["Broker", RequestContext, Any], Awaitable[Any | None]]


class Streamed(Protocol):
    """A piece of a response read only while it is written (stored records), in
    bounded pieces, so a response never sits whole in memory."""

    def __len__(self) -> int: ...
    def pieces(self) -> Iterator[bytes | memoryview]: ...


Chunk = bytes | bytearray | memoryview | Streamed
# Turns a handler's reply into the frame's bytes, in pieces written one after another.
Encoder = Callable[[Any, int, int], list[Chunk]]


@dataclass(frozen=True, slots=True)
class ApiSpec:
    key: int
    name: str
    request: Any  # a kafka-python ApiMessage request class
    response: Any  # its response class
    min_version: int
    max_version: int
    handler: Handler
    encoder: Encoder | None = None  # None: the reply is a response object, encoded whole

    def supports(self, version: int) -> bool:
        return self.min_version <= version <= self.max_version


APIS: dict[int, ApiSpec] = {}


def api(
    request: Any, response: Any, versions: tuple[int, int], encoder: Encoder | None = None
) -> Callable[[Handler], Handler]:
    """Register ``handler`` for ``request``'s API key, serving ``versions`` (inclusive)."""

    def register(handler: Handler) -> Handler:
        key = int(request.API_KEY)
        if key in APIS:
            raise RuntimeError(f"API key {key} registered twice")
        low, high = versions
        if high > request.max_version:
            raise RuntimeError(f"{request.name} v{high} is newer than the protocol library knows")
        name = str(request.name).removesuffix("Request")
        APIS[key] = ApiSpec(key, name, request, response, low, high, handler, encoder)
        return handler

    return register


def encode_frame(spec: ApiSpec, reply: Any, version: int, correlation_id: int) -> list[Chunk]:
    """The response frame for a handler's reply, as the pieces to write in order."""
    if spec.encoder is not None:
        return spec.encoder(reply, version, correlation_id)
    return [encode_response(reply, version, correlation_id)]


def encode_response(response: Any, version: int, correlation_id: int) -> bytearray:
    """A complete response frame (size prefix included) for ``response``."""
    # The version goes first: kafka-python's version setter would also write it
    # into a header, and response headers have no version field.
    response.API_VERSION = version
    response.with_header(correlation_id=correlation_id)
    encoded: bytearray = response.encode(header=True, framed=True)
    return encoded  # written to the socket as it is: a bytes() copy would cost a memcpy
