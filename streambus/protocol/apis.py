"""The dispatch table: one handler per Kafka API key, registered once.

Each handler module lists its handlers in an ``ApiRoutes``; the composition
module (``streambus.app``) merges them into the one table the server serves.

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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kafka.protocol.metadata import ApiVersionsResponse

from streambus.protocol.context import BrokerServices

if TYPE_CHECKING:
    from streambus.security.sasl import SaslSession

# Request header v0/v1/v2 all start with these fields; they are read before
# the full header so that an unknown API or version can still be answered.
#   api_key        int16  which API
#   api_version    int16  version of that API's request schema
#   correlation_id int32  echoed in the response so the client can match it
REQUEST_PREFIX = struct.Struct(">hhi")

# Response frames: size int32 (bytes that follow), then the response header.
FRAME_SIZE = struct.Struct(">i")


@dataclass(slots=True)
class Throttle:
    """What a quota asks of the connection once a request is answered: read none of its
    requests for ``ms`` (Kafka mutes the channel). ``delay_response``: hold the response
    itself that long first, for request versions older than KIP-219, whose clients do
    not wait out ``throttle_time_ms`` themselves."""

    ms: int = 0
    delay_response: bool = False


@dataclass(frozen=True, slots=True)
class RequestContext:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    peer: str
    # Who is asking (Kafka's principal, "User:name") and on which listener; set from
    # authentication, User:ANONYMOUS until a client authenticates.
    principal: str = "User:ANONYMOUS"
    listener: str = "PLAINTEXT"
    # Completes when the client goes (EOF or lost connection): a handler that waits
    # (a long poll) stops waiting for a client that can no longer take the answer.
    closed: asyncio.Future[None] | None = None
    # The table being served (ApiVersions lists it).
    apis: Mapping[int, ApiSpec] = field(default_factory=dict)
    # Set by a handler whose client went over its quota (see streambus.quotas).
    throttle: Throttle = field(default_factory=Throttle)
    # The connection's SASL state, on a SASL listener (SaslHandshake/SaslAuthenticate use it).
    session: SaslSession | None = None


class ConnectionClosedError(Exception):
    """This connection is finished (peer closed, or it sent something unparseable)."""


Handler = Callable[[BrokerServices, RequestContext, Any], Awaitable[Any | None]]


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


ApiTable = Mapping[int, ApiSpec]


class ApiRoutes:
    """The handlers one module serves, in the order they were declared."""

    def __init__(self) -> None:
        self.specs: list[ApiSpec] = []

    def api(
        self,
        request: Any,
        response: Any,
        versions: tuple[int, int],
        encoder: Encoder | None = None,
    ) -> Callable[[Handler], Handler]:
        """Declare ``handler`` for ``request``'s API key, serving ``versions`` (inclusive)."""

        def declare(handler: Handler) -> Handler:
            low, high = versions
            if high > request.max_version:
                raise RuntimeError(
                    f"{request.name} v{high} is newer than the protocol library knows"
                )
            name = str(request.name).removesuffix("Request")
            key = int(request.API_KEY)
            self.specs.append(ApiSpec(key, name, request, response, low, high, handler, encoder))
            return handler

        return declare


def build_table(*routes: ApiRoutes) -> dict[int, ApiSpec]:
    """One table from every module's routes; an API key declared twice is a bug."""
    table: dict[int, ApiSpec] = {}
    for group in routes:
        for spec in group.specs:
            if spec.key in table:
                raise RuntimeError(f"API key {spec.key} registered twice")
            table[spec.key] = spec
    return table


def api_versions_response(table: ApiTable, error_code: int = 0) -> Any:
    keys = [
        ApiVersionsResponse.ApiVersion(
            api_key=spec.key, min_version=spec.min_version, max_version=spec.max_version
        )
        for spec in sorted(table.values(), key=lambda s: s.key)
    ]
    return ApiVersionsResponse(error_code=error_code, api_keys=keys, throttle_time_ms=0)


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
