"""Writes go to the broker leading ``_schemas`` partition 0; the others forward them.

A write (register, delete, config or mode change) arriving at a broker that does not
lead the partition is sent to the leader's registry (its advertised host and the
registry port it registered in the cluster metadata), over HTTPS when the registries
serve it (the leader's certificate checked against the CA, ``tls.py``), and the
leader's status and body are answered unchanged. The leader tells, in a header, the
``_schemas`` offset its state had reached; the forwarding broker waits (bounded) until
its own state reached it too, so a read on the same broker right after sees the write.

No leader (yet, or the topic is still being created) is waited for a few seconds, then
answered with Confluent's 50004; a leader that cannot be reached with 50003. A request
that was already forwarded once is handled where it lands, never forwarded again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from streambus.schemas.errors import ForwardingError, UnknownLeaderError
from streambus.schemas.registry import SchemaRegistry
from streambus.schemas.remote import SchemasLeader
from streambus.schemas.storage import SCHEMAS_PARTITION

__all__ = ["FORWARDED_HEADER", "OFFSET_HEADER", "Forwarder", "SchemasLeader", "is_write"]

log = logging.getLogger("streambus.schemas")

OFFSET_HEADER = "X-StreamBus-Schemas-Offset"  # the leader's applied offset after a write
FORWARDED_HEADER = "X-StreamBus-Forwarded"
_LEADER_WAIT_S = 10.0
_FORWARD_TIMEOUT_S = 30.0
_APPLY_WAIT_S = 10.0


def is_write(method: str, route: str) -> bool:
    """The routes that change the registry (lookup and compatibility POSTs only read)."""
    return method in ("PUT", "DELETE") or (
        method == "POST" and route == "/subjects/{subject}/versions"
    )


class Forwarder:
    def __init__(
        self,
        registry: SchemaRegistry,
        broker_id: int,
        leader: Callable[[], SchemasLeader],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._registry = registry
        self._broker_id = broker_id
        self._leader = leader
        self._ssl = ssl_context  # None: the registries speak plain HTTP
        self._scheme = "http" if ssl_context is None else "https"
        self._session: aiohttp.ClientSession | None = None

    def leads_locally(self) -> bool:
        """This broker leads the partition and its copy is ready to be written."""
        service = self._registry.log.service
        if not self._registry.log.exists():
            return False
        replica = service.replica(SCHEMAS_PARTITION)
        return replica is None or replica.is_leader

    async def _target(self) -> SchemasLeader | None:
        """The leader to forward to; None: this broker handles the write."""
        deadline = time.monotonic() + _LEADER_WAIT_S
        while True:
            leader = self._leader()
            if not leader.exists:
                await self._registry.ensure_topic()
            elif leader.broker_id == self._broker_id:
                if self.leads_locally():
                    return None
            elif leader.broker_id >= 0:
                if not leader.registry_port:
                    raise ForwardingError(
                        f"Error while forwarding the request to the primary: broker "
                        f"{leader.broker_id} leads _schemas but serves no schema registry"
                    )
                return leader
            if time.monotonic() >= deadline:
                raise UnknownLeaderError(
                    "Error while forwarding the request to the primary: no broker leads "
                    "_schemas partition 0"
                )
            await asyncio.sleep(0.1)

    async def forward(self, request: web.Request) -> web.Response | None:
        """The leader's answer to ``request``; None: handle it here."""
        if FORWARDED_HEADER in request.headers:
            return None
        target = await self._target()
        if target is None:
            return None
        body = await request.read()
        url = f"{self._scheme}://{target.host}:{target.registry_port}{request.rel_url}"
        headers = {FORWARDED_HEADER: str(self._broker_id)}
        # The leader authenticates and authorizes the caller again, as the same principal.
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            headers["Authorization"] = authorization
        if request.content_type:
            headers["Content-Type"] = request.headers.get("Content-Type", request.content_type)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_FORWARD_TIMEOUT_S),
                # The leader's certificate is checked against the CA, host name included.
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
            )
        try:
            async with self._session.request(
                request.method, url, data=body, headers=headers
            ) as response:
                answer = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "")
                offset = response.headers.get(OFFSET_HEADER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ForwardingError(
                f"Error while forwarding the request to the primary (broker "
                f"{target.broker_id} at {target.host}:{target.registry_port}): {exc or 'timeout'}"
            ) from None
        # Read-your-write here: the leader's state had these records when it answered.
        if (
            offset is not None
            and status < 300
            and not await self._registry.tail.wait_applied(int(offset), _APPLY_WAIT_S)
        ):
            log.warning(
                "schema registry: a forwarded write at offset %s was not applied here "
                "within %.0f s",
                offset,
                _APPLY_WAIT_S,
            )
        out = web.Response(body=answer, status=status)
        out.headers["Content-Type"] = content_type or "application/json"
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
