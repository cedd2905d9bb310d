"""Confluent Schema Registry's REST API, served by aiohttp on the broker's event loop.

Handlers are thin: they read the path and query, call the registry, and answer JSON in
Confluent's content type. Errors are answered from the exception: the registry's carry
Confluent's ``error_code``; aiohttp's own (unknown route, a body over the size limit)
get a body of the same shape. One middleware times, counts and traces each request by
its route template, never by the subject or id in the path. In a cluster the same
middleware forwards writes to the broker leading ``_schemas`` (``forward.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from streambus.errors import SecurityNotReadyError
from streambus.instrumentation import BrokerTelemetry
from streambus.schemas.auth import (
    REALM,
    RETRY_AFTER_S,
    RegistryNotReadyError,
    RegistrySecurity,
    RestRequester,
)
from streambus.schemas.errors import (
    SchemaNotFoundError,
    SchemaRegistryError,
    UnauthorizedError,
    UnprocessableEntityError,
)
from streambus.schemas.formats import (
    AVRO,
    SCHEMA_TYPES,
    RegisteredSchema,
    SchemaReference,
)
from streambus.schemas.forward import OFFSET_HEADER, Forwarder, is_write
from streambus.schemas.protobuf_format import PROTOBUF, serialized
from streambus.schemas.registry import NewSchema, SchemaRegistry, default_type
from streambus.schemas.store import Version

log = logging.getLogger("streambus.schemas")

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
MAX_BODY_BYTES = 16 * 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The request's caller, set by the middleware
REQUESTER = web.RequestKey("streambus_requester", RestRequester)


def _answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, ensure_ascii=False), status=status, content_type=CONTENT_TYPE
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _answer({"error_code": code, "message": message}, status)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # aiohttp raises 413 past client_max_size
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnprocessableEntityError(f"Malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UnprocessableEntityError("Malformed JSON: the body must be a JSON object")
    return body


def _new_schema(body: dict[str, Any]) -> NewSchema:
    schema = body.get("schema")
    if not isinstance(schema, str):
        raise UnprocessableEntityError("Unrecognized field or missing 'schema': a string")
    try:
        refs = tuple(
            SchemaReference(str(r["name"]), str(r["subject"]), int(r["version"]))
            for r in body.get("references") or ()
        )
    except (KeyError, TypeError, ValueError):
        raise UnprocessableEntityError(
            "Malformed references: each needs name, subject and version"
        ) from None
    return NewSchema(default_type(body.get("schemaType")), schema, refs)


def _schema_fields(schema: RegisteredSchema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if schema.schema_type != AVRO:
        out["schemaType"] = schema.schema_type
    if schema.references:
        out["references"] = [r.to_json() for r in schema.references]
    return out


async def _formatted(schema: RegisteredSchema, request: web.Request) -> str:
    """The schema text, or with ``format=serialized`` a PROTOBUF schema as the base64
    FileDescriptorProto Confluent's protobuf serializers and deserializers ask for."""
    if schema.schema_type != PROTOBUF or request.query.get("format") != "serialized":
        return schema.schema
    return await asyncio.to_thread(serialized, schema.schema)


def _requester(request: web.Request) -> RestRequester:
    return request[REQUESTER]


def _id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise SchemaNotFoundError("Schema not found") from None


class RegistryApi:
    def __init__(self, registry: SchemaRegistry, security: RegistrySecurity) -> None:
        self.r = registry
        self.security = security

    def _schema_readable(self, request: web.Request) -> RegisteredSchema:
        """The schema of the path's id, if the caller may read a subject holding it."""
        schema_id = _id(request)
        schema = self.r.schema(schema_id)
        uses = self.r.schema_versions(schema_id, True)
        self.security.require_any_subject(_requester(request), sorted({v.subject for v in uses}))
        return schema

    async def _version_body(self, v: Version, request: web.Request) -> dict[str, Any]:
        schema = self.r.schema(v.schema_id)
        return {
            "subject": v.subject,
            "version": v.version,
            "id": v.schema_id,
            **_schema_fields(schema),
            "schema": await _formatted(schema, request),
        }

    async def root(self, _: web.Request) -> web.Response:
        return _answer({})

    async def subjects(self, request: web.Request) -> web.Response:
        subjects = self.r.subjects(_flag(request, "deleted"))
        return _answer(self.security.readable(_requester(request), subjects))

    async def list_versions(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        return _answer(self.r.versions(subject, _flag(request, "deleted")))

    async def register(self, request: web.Request) -> web.Response:
        body = await _body(request)
        new = _new_schema(body)
        explicit = body.get("id")
        schema_id = await self.r.register(
            request.match_info["subject"],
            new,
            normalize=_flag(request, "normalize"),
            schema_id=int(explicit) if isinstance(explicit, int) and explicit > 0 else None,
        )
        return _answer({"id": schema_id})

    async def get_version(self, request: web.Request) -> web.Response:
        v = self.r.version(
            request.match_info["subject"], request.match_info["version"], _flag(request, "deleted")
        )
        return _answer(await self._version_body(v, request))

    async def get_version_schema(self, request: web.Request) -> web.Response:
        v = self.r.version(
            request.match_info["subject"], request.match_info["version"], _flag(request, "deleted")
        )
        return web.Response(text=self.r.schema(v.schema_id).schema, content_type=CONTENT_TYPE)

    async def referenced_by(self, request: web.Request) -> web.Response:
        v = self.r.version(request.match_info["subject"], request.match_info["version"], True)
        ids = sorted(
            s.schema_id
            for s in self.r.store.schemas.values()
            if any(ref.subject == v.subject and ref.version == v.version for ref in s.references)
        )
        return _answer(ids)

    async def delete_version(self, request: web.Request) -> web.Response:
        version = await self.r.delete_version(
            request.match_info["subject"],
            request.match_info["version"],
            _flag(request, "permanent"),
        )
        return _answer(version)

    async def lookup(self, request: web.Request) -> web.Response:
        new = _new_schema(await _body(request))
        v = await self.r.lookup(
            request.match_info["subject"],
            new,
            normalize=_flag(request, "normalize"),
            deleted=_flag(request, "deleted"),
        )
        return _answer(await self._version_body(v, request))

    async def delete_subject(self, request: web.Request) -> web.Response:
        versions = await self.r.delete_subject(
            request.match_info["subject"], _flag(request, "permanent")
        )
        return _answer(versions)

    async def schema_by_id(self, request: web.Request) -> web.Response:
        schema = self._schema_readable(request)
        text = await _formatted(schema, request)
        return _answer({"schema": text, **_schema_fields(schema)})

    async def schema_text(self, request: web.Request) -> web.Response:
        schema = self._schema_readable(request)
        return web.Response(text=schema.schema, content_type=CONTENT_TYPE)

    async def schema_versions(self, request: web.Request) -> web.Response:
        uses = self.r.schema_versions(_id(request), _flag(request, "deleted"))
        mine = set(self.security.readable(_requester(request), {v.subject for v in uses}))
        return _answer(
            [{"subject": v.subject, "version": v.version} for v in uses if v.subject in mine]
        )

    async def schema_subjects(self, request: web.Request) -> web.Response:
        uses = self.r.schema_versions(_id(request), _flag(request, "deleted"))
        return _answer(
            sorted(self.security.readable(_requester(request), {v.subject for v in uses}))
        )

    async def types(self, _: web.Request) -> web.Response:
        return _answer(list(SCHEMA_TYPES))

    async def get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info.get("subject")
        level = self.r.config(subject, _flag(request, "defaultToGlobal"))
        return _answer({"compatibilityLevel": level})

    async def put_config(self, request: web.Request) -> web.Response:
        body = await _body(request)
        level = await self.r.set_config(
            request.match_info.get("subject"), body.get("compatibility")
        )
        return _answer({"compatibility": level})

    async def delete_config(self, request: web.Request) -> web.Response:
        previous = await self.r.delete_config(request.match_info.get("subject"))
        return _answer({"compatibilityLevel": previous})

    async def compatibility(self, request: web.Request) -> web.Response:
        new = _new_schema(await _body(request))
        messages = await self.r.test_compatibility(
            request.match_info["subject"],
            request.match_info.get("version"),
            new,
            _flag(request, "normalize"),
        )
        body: dict[str, Any] = {"is_compatible": not messages}
        if _flag(request, "verbose"):
            body["messages"] = messages
        return _answer(body)

    async def get_mode(self, request: web.Request) -> web.Response:
        return _answer({"mode": self.r.mode(request.match_info.get("subject"))})

    async def put_mode(self, request: web.Request) -> web.Response:
        body = await _body(request)
        mode = await self.r.set_mode(request.match_info.get("subject"), body.get("mode"))
        return _answer({"mode": mode})


def build_app(
    registry: SchemaRegistry,
    telemetry: BrokerTelemetry,
    forwarder: Forwarder | None = None,
    security: RegistrySecurity | None = None,
) -> web.Application:
    if security is None:
        security = RegistrySecurity("none", None, None, telemetry, None)
    api = RegistryApi(registry, security)

    @web.middleware
    async def confluent(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        route_info = request.match_info.route.resource
        route = route_info.canonical if route_info is not None else "unmatched"
        span = telemetry.registry_span(request.method, route)
        write = is_write(request.method, route)
        peer = _peer(request)
        try:
            # Who asks, and may they: before forwarding, and again on the leader, which
            # receives the caller's Authorization header. Both read the ACLs and
            # credentials: held until they are loaded.
            await security.ready(request.method, route, peer)
            requester = await security.authenticate(request.headers.get("Authorization"), peer)
            request[REQUESTER] = requester
            if route_info is not None:
                security.check_route(requester, request.method, route, request.match_info)
            forwarded = None
            if write and forwarder is not None:
                forwarded = await forwarder.forward(request)
            if forwarded is not None:
                response: web.StreamResponse = forwarded
            else:
                response = await handler(request)
                if write:  # what a forwarding broker waits for before it answers
                    response.headers[OFFSET_HEADER] = str(registry.tail.applied)
        except (SchemaRegistryError, SecurityNotReadyError) as exc:
            if isinstance(exc, SecurityNotReadyError):  # unloaded again (a broker stopping)
                exc = security.not_ready(request.method, route, peer)
            response = _error(exc.http_status, exc.error_code, str(exc))
            if isinstance(exc, UnauthorizedError):
                response.headers["WWW-Authenticate"] = REALM
            if isinstance(exc, RegistryNotReadyError):
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large
            response = _error(exc.status, exc.status, exc.reason)
        except Exception:
            log.exception("schema registry: %s %s failed", request.method, request.path)
            response = _error(500, 50001, "Error in the backend data store")
        status = response.status
        telemetry.registry_request(request.method, route, status, time.monotonic() - started, span)
        return response

    app = web.Application(middlewares=[confluent], client_max_size=MAX_BODY_BYTES)
    add = app.router.add_route
    add("GET", "/", api.root)
    add("GET", "/subjects", api.subjects)
    add("GET", "/subjects/{subject}/versions", api.list_versions)
    add("POST", "/subjects/{subject}/versions", api.register)
    add("GET", "/subjects/{subject}/versions/{version}", api.get_version)
    add("DELETE", "/subjects/{subject}/versions/{version}", api.delete_version)
    add("GET", "/subjects/{subject}/versions/{version}/schema", api.get_version_schema)
    add("GET", "/subjects/{subject}/versions/{version}/referencedby", api.referenced_by)
    add("POST", "/subjects/{subject}", api.lookup)
    add("DELETE", "/subjects/{subject}", api.delete_subject)
    add("GET", "/schemas/ids/{id}", api.schema_by_id)
    add("GET", "/schemas/ids/{id}/schema", api.schema_text)
    add("GET", "/schemas/ids/{id}/versions", api.schema_versions)
    add("GET", "/schemas/ids/{id}/subjects", api.schema_subjects)
    add("GET", "/schemas/types", api.types)
    for path in ("/config", "/config/{subject}"):
        add("GET", path, api.get_config)
        add("PUT", path, api.put_config)
        add("DELETE", path, api.delete_config)
    add("POST", "/compatibility/subjects/{subject}/versions/{version}", api.compatibility)
    add("POST", "/compatibility/subjects/{subject}/versions", api.compatibility)
    for path in ("/mode", "/mode/{subject}"):
        add("GET", path, api.get_mode)
        add("PUT", path, api.put_mode)
    return app


def _peer(request: web.Request) -> str:
    """``host:port`` of the client, as the authorizer and the audit log name it."""
    transport = request.transport
    address = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return request.remote or "unknown"


class RegistryServer:
    """The REST listener, started and stopped with the broker."""

    def __init__(
        self,
        registry: SchemaRegistry,
        telemetry: BrokerTelemetry,
        host: str,
        port: int,
        forwarder: Forwarder | None = None,
        *,
        security: RegistrySecurity | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._app = build_app(registry, telemetry, forwarder, security)
        self._forwarder = forwarder
        self._host, self._requested = host, port
        self._ssl = ssl_context  # None: plain HTTP
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested, ssl_context=self._ssl)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            self.port = int(address[1])
            break
        log.info(
            "schema registry listening on %s://%s:%d",
            "http" if self._ssl is None else "https",
            self._host,
            self.port,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._forwarder is not None:
            await self._forwarder.close()
