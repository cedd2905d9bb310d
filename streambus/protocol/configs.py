"""DescribeConfigs, AlterConfigs and IncrementalAlterConfigs: Kafka's config APIs.

Resources, as Kafka numbers them:

- TOPIC (2): every topic config Kafka 4.4 defines, each with where its value comes
  from, in Kafka's synonym order: the topic's own override (DYNAMIC_TOPIC_CONFIG),
  this broker's dynamic config, the cluster's dynamic default, the static broker
  setting (``--topic-config``/``STREAMBUS_TOPIC_*``), the built-in default.
- BROKER (4): this broker's settings (read-only; changed by a restart) and the
  broker-wide topic defaults by their broker names (``log.retention.ms``), which
  are dynamic: set for every broker (resource name "") or one (its id).
- BROKER_LOGGER (8): this process's Python loggers, their levels set at runtime
  and, as in Kafka, not kept across a restart.

Alterations go through the cluster's metadata quorum (``AlterTopicConfigs`` and
``AlterBrokerConfigs`` records): every broker applies them at once, and they
survive restarts. StreamBus has no alter.config.policy, so POLICY_VIOLATION is
never answered.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from kafka.protocol.admin import (
    AlterConfigsRequest,
    AlterConfigsResponse,
    DescribeConfigsRequest,
    DescribeConfigsResponse,
    IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse,
)

from streambus.cluster import acls
from streambus.config import BrokerConfig
from streambus.config_docs import BROKER_FIELDS, TOPIC_DOCS
from streambus.errors import (
    InvalidConfigError,
    InvalidRequestError,
    StreamBusError,
    UnknownTopicOrPartitionError,
)
from streambus.protocol.apis import ApiRoutes, RequestContext
from streambus.topic_config import (
    APPLIED,
    BROKER_SYNONYMS,
    SPECS,
    ConfigType,
    default_value,
    render,
    with_dynamic_defaults,
)

if TYPE_CHECKING:
    from streambus.protocol.context import BrokerServices

log = logging.getLogger("streambus.protocol")
routes = ApiRoutes()


class Resource(enum.IntEnum):
    TOPIC = 2
    BROKER = 4
    BROKER_LOGGER = 8


class Source(enum.IntEnum):
    """DescribeConfigs' ConfigSource."""

    DYNAMIC_TOPIC_CONFIG = 1
    DYNAMIC_BROKER_CONFIG = 2
    DYNAMIC_DEFAULT_BROKER_CONFIG = 3
    STATIC_BROKER_CONFIG = 4
    DEFAULT_CONFIG = 5
    DYNAMIC_BROKER_LOGGER_CONFIG = 6


class Op(enum.IntEnum):
    """IncrementalAlterConfigs' operations."""

    SET = 0
    DELETE = 1
    APPEND = 2
    SUBTRACT = 3


NOT_APPLIED = " StreamBus stores this setting but does not apply it."
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")
_PY_LEVELS = {"TRACE": 5, "WARN": logging.WARNING, "FATAL": logging.CRITICAL, "OFF": 100}


class Entry(NamedTuple):
    name: str
    value: str | None
    source: Source
    read_only: bool
    sensitive: bool
    kind: ConfigType
    doc: str
    synonyms: list[tuple[str, str | None, Source]]


# -- describing --------------------------------------------------------------------------------


def _topic_chain(
    services: BrokerServices, key: str, overrides: Mapping[str, str]
) -> list[tuple[str, str | None, Source]]:
    """Where ``key``'s value may come from, first the one that wins (Kafka's synonyms)."""
    chain: list[tuple[str, str | None, Source]] = []
    if key in overrides:
        chain.append((key, overrides[key], Source.DYNAMIC_TOPIC_CONFIG))
    synonym = SPECS[key].synonym
    if synonym is not None:
        chain.extend(_broker_chain(services, synonym, key))
    else:
        chain.append((key, default_value(key), Source.DEFAULT_CONFIG))
    return chain


def _broker_chain(
    services: BrokerServices, synonym: str, key: str
) -> list[tuple[str, str | None, Source]]:
    dynamic = services.quorum.state.broker_configs
    chain: list[tuple[str, str | None, Source]] = []
    mine = dynamic.get(str(services.broker_id), {})
    if synonym in mine:
        chain.append((synonym, mine[synonym], Source.DYNAMIC_BROKER_CONFIG))
    cluster = dynamic.get("", {})
    if synonym in cluster:
        chain.append((synonym, cluster[synonym], Source.DYNAMIC_DEFAULT_BROKER_CONFIG))
    field = SPECS[key].name.replace(".", "_")
    static = render(getattr(services.config.topic_defaults, field))
    if static != default_value(key):
        chain.append((synonym, static, Source.STATIC_BROKER_CONFIG))
    chain.append((synonym, default_value(key), Source.DEFAULT_CONFIG))
    return chain


def _topic_doc(key: str) -> str:
    return TOPIC_DOCS[key] + ("" if key in APPLIED else NOT_APPLIED)


def _effective(services: BrokerServices, overrides: Mapping[str, str]) -> dict[str, str]:
    """A topic's settings on this broker, from the replicated state alone (what every
    broker's storage applies once it has caught up with the state)."""
    state = services.quorum.state
    defaults = with_dynamic_defaults(
        services.config.topic_defaults, state.broker_configs, services.broker_id
    )
    return defaults.with_overrides(overrides).to_kafka()


def describe_topic(services: BrokerServices, name: str) -> list[Entry]:
    topic = services.quorum.state.topics.get(name)
    if topic is None:
        raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
    effective = _effective(services, topic.configs)
    out = []
    for key, spec in SPECS.items():
        chain = _topic_chain(services, key, topic.configs)
        out.append(
            Entry(key, effective[key], chain[0][2], False, False, spec.kind, _topic_doc(key), chain)
        )
    return out


def _check_broker(services: BrokerServices, name: str, *, default_ok: bool) -> str:
    """The entity a BROKER resource names: "" (every broker) or a broker id."""
    if name == "" and default_ok:
        return name
    if not name.isdigit():
        raise InvalidRequestError(f"broker resource {name!r} is not a broker id")
    return str(int(name))


def describe_broker(services: BrokerServices, name: str) -> list[Entry]:
    entity = _check_broker(services, name, default_ok=True)
    dynamic = services.quorum.state.broker_configs
    if entity == "":  # the cluster-wide default: only what is set there, as Kafka answers
        out = []
        for synonym, value in sorted(dynamic.get("", {}).items()):
            key = BROKER_SYNONYMS[synonym]
            source = Source.DYNAMIC_DEFAULT_BROKER_CONFIG
            out.append(
                Entry(
                    synonym,
                    value,
                    source,
                    False,
                    False,
                    SPECS[key].kind,
                    _default_doc(key),
                    [(synonym, value, source)],
                )
            )
        return out
    if int(entity) != services.broker_id:
        # Kafka's answer too: a broker describes itself; clients send it to that broker.
        raise InvalidRequestError(
            f"unexpected broker id, expected {services.broker_id} but received {entity}"
        )
    return _static_entries(services.config) + _default_entries(services)


def _default_doc(key: str) -> str:
    return f"The default {key} of topics that do not set it. " + _topic_doc(key)


def _default_entries(services: BrokerServices) -> list[Entry]:
    out = []
    for synonym, key in BROKER_SYNONYMS.items():
        chain = _broker_chain(services, synonym, key)
        value, source = chain[0][1], chain[0][2]
        out.append(
            Entry(synonym, value, source, False, False, SPECS[key].kind, _default_doc(key), chain)
        )
    return out


def _static_entries(config: BrokerConfig) -> list[Entry]:
    built_in = BrokerConfig()
    listener = f"PLAINTEXT://{config.host}:{config.port}"
    listener_default = f"PLAINTEXT://{built_in.host}:{built_in.port}"
    source = Source.STATIC_BROKER_CONFIG if listener != listener_default else Source.DEFAULT_CONFIG
    out = [
        Entry(
            "listeners",
            listener,
            source,
            True,
            False,
            ConfigType.LIST,
            "The address and port the Kafka listener binds.",
            [("listeners", listener, source)],
        )
    ]
    for field in dataclasses.fields(BrokerConfig):
        if field.name not in BROKER_FIELDS:
            continue
        name, doc = BROKER_FIELDS[field.name]
        raw, default = getattr(config, field.name), getattr(built_in, field.name)
        source = Source.STATIC_BROKER_CONFIG if raw != default else Source.DEFAULT_CONFIG
        sensitive = field.name == "cluster_secret"
        if field.name == "advertised_host":
            raw = f"PLAINTEXT://{config.advertised}:{config.port}"
        value = None if raw is None or sensitive else render(raw)
        if sensitive:
            kind = ConfigType.PASSWORD
        elif isinstance(raw, bool):
            kind = ConfigType.BOOLEAN
        elif isinstance(raw, int):
            kind = ConfigType.LONG if name.endswith((".ms", ".bytes")) else ConfigType.INT
        elif isinstance(raw, float):
            kind = ConfigType.DOUBLE
        else:
            kind = ConfigType.STRING
        out.append(Entry(name, value, source, True, sensitive, kind, doc, [(name, value, source)]))
    return out


def _loggers() -> dict[str, logging.Logger]:
    found = {
        name: logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "streambus"
    }
    return {"root": logging.root, **dict(sorted(found.items()))}


def _level_name(logger: logging.Logger) -> str:
    level = logger.getEffectiveLevel()
    for name, number in _PY_LEVELS.items():
        if number == level:
            return name
    return logging.getLevelName(level)


def describe_loggers() -> list[Entry]:
    source = Source.DYNAMIC_BROKER_LOGGER_CONFIG
    return [
        Entry(
            name,
            _level_name(logger),
            source,
            False,
            False,
            ConfigType.STRING,
            "The logger's level (set at runtime, not kept across a restart).",
            [],
        )
        for name, logger in _loggers().items()
    ]


@routes.api(DescribeConfigsRequest, DescribeConfigsResponse, versions=(0, 4))
async def handle_describe_configs(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    R = DescribeConfigsResponse
    version = ctx.api_version
    synonyms = version >= 1 and bool(request.include_synonyms)
    docs = version >= 3 and bool(request.include_documentation)
    results = []
    for resource in request.resources:
        kind, name = int(resource.resource_type), str(resource.resource_name)
        result = R.DescribeConfigsResult(
            error_code=0, error_message=None, resource_type=kind, resource_name=name, configs=[]
        )
        try:
            _authorize(services, ctx, acls.DESCRIBE_CONFIGS, kind, name)
            if kind == Resource.TOPIC:
                entries = describe_topic(services, name)
            elif kind == Resource.BROKER:
                entries = describe_broker(services, name)
            elif kind == Resource.BROKER_LOGGER:
                _check_broker(services, name, default_ok=False)
                entries = describe_loggers()
            else:
                raise InvalidRequestError(f"resource type {kind} is not supported")
        except StreamBusError as exc:
            services.telemetry.error("DescribeConfigs", exc.kafka_name)
            result.error_code = exc.errno
            result.error_message = str(exc)
            results.append(result)
            continue
        wanted = None if resource.configuration_keys is None else set(resource.configuration_keys)
        result.configs = [
            _encode_entry(entry, version, synonyms, docs)
            for entry in entries
            if wanted is None or entry.name in wanted
        ]
        results.append(result)
    return R(throttle_time_ms=0, results=results)


def _encode_entry(entry: Entry, version: int, synonyms: bool, docs: bool) -> Any:
    C = DescribeConfigsResponse.DescribeConfigsResult.DescribeConfigsResourceResult
    out = C(
        name=entry.name,
        value=entry.value,
        read_only=entry.read_only,
        is_sensitive=entry.sensitive,
    )
    if version == 0:
        out.is_default = entry.source == Source.DEFAULT_CONFIG
        return out
    out.config_source = int(entry.source)
    out.synonyms = (
        [C.DescribeConfigsSynonym(name=n, value=v, source=int(s)) for n, v, s in entry.synonyms]
        if synonyms
        else []
    )
    if version >= 3:
        out.config_type = int(entry.kind)
        out.documentation = entry.doc if docs else None
    return out


# -- altering ----------------------------------------------------------------------------------


def _no_duplicates(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidRequestError(f"config {name!r} appears more than once")
        seen.add(name)


def _list_value(current: str | None) -> list[str]:
    return [item.strip() for item in (current or "").split(",") if item.strip()]


async def _alter(
    services: BrokerServices,
    kind: int,
    name: str,
    changes: dict[str, str | None],
    *,
    replace: bool,
    validate_only: bool,
) -> None:
    if kind == Resource.TOPIC:
        if not name:
            raise InvalidRequestError("a topic resource needs a topic name")
        await services.alter_topic_configs(
            name, changes, replace=replace, validate_only=validate_only
        )
    elif kind == Resource.BROKER:
        entity = _check_broker(services, name, default_ok=True)
        await services.alter_broker_configs(
            entity, changes, replace=replace, validate_only=validate_only
        )
    elif kind == Resource.BROKER_LOGGER:
        _check_broker(services, name, default_ok=False)
        if replace:
            raise InvalidRequestError("broker loggers are altered by IncrementalAlterConfigs")
        _alter_loggers(changes, validate_only)
    else:
        raise InvalidRequestError(f"resource type {kind} is not supported")


def _alter_loggers(changes: Mapping[str, str | None], validate_only: bool) -> None:
    loggers = _loggers()
    levels: dict[str, int] = {}
    for name, level in changes.items():
        if name not in loggers and name.split(".")[0] != "streambus":
            raise InvalidConfigError(f"logger {name} does not exist")
        if level is None:
            levels[name] = logging.NOTSET if name != "root" else logging.WARNING
            continue
        text = level.upper()
        if text not in LOG_LEVELS:
            raise InvalidConfigError(f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
        levels[name] = _PY_LEVELS.get(text) or logging.getLevelName(text)
    if validate_only:
        return
    for name, number in levels.items():
        target = logging.root if name == "root" else logging.getLogger(name)
        target.setLevel(number)
        log.info("logger %s level set to %s", name, logging.getLevelName(number))


def _response(results: list[tuple[int, str, StreamBusError | None]], cls: Any) -> Any:
    return cls(
        throttle_time_ms=0,
        responses=[
            cls.AlterConfigsResourceResponse(
                error_code=0 if error is None else error.errno,
                error_message=None if error is None else str(error),
                resource_type=kind,
                resource_name=name,
            )
            for kind, name, error in results
        ],
    )


def _authorize(
    services: BrokerServices, ctx: RequestContext, operation: int, kind: int, name: str
) -> None:
    """Kafka's check: the operation on the topic, or on the cluster for broker resources."""
    if kind == Resource.TOPIC:
        services.authorizer.require(ctx, operation, acls.TOPIC, name)
    else:
        services.authorizer.require(ctx, operation, acls.CLUSTER)


def _duplicate_resources(request: Any) -> set[tuple[int, str]]:
    keys = [(int(r.resource_type), str(r.resource_name)) for r in request.resources]
    return {k for k in keys if keys.count(k) > 1}


@routes.api(AlterConfigsRequest, AlterConfigsResponse, versions=(0, 2))
async def handle_alter_configs(services: BrokerServices, ctx: RequestContext, request: Any) -> Any:
    """The legacy API: each resource's configs are replaced by the request's whole set."""

    def changes(kind: int, name: str, configs: Any) -> dict[str, str | None]:
        return {c.name: c.value for c in configs}

    results = await _alter_each(services, ctx, request, "AlterConfigs", changes, replace=True)
    return _response(results, AlterConfigsResponse)


@routes.api(IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, versions=(0, 1))
async def handle_incremental_alter_configs(
    services: BrokerServices, ctx: RequestContext, request: Any
) -> Any:
    def changes(kind: int, name: str, configs: Any) -> dict[str, str | None]:
        return _incremental(services, kind, name, configs)

    results = await _alter_each(
        services, ctx, request, "IncrementalAlterConfigs", changes, replace=False
    )
    return _response(results, IncrementalAlterConfigsResponse)


async def _alter_each(
    services: BrokerServices,
    ctx: RequestContext,
    request: Any,
    api: str,
    changes_of: Callable[[int, str, Any], dict[str, str | None]],
    *,
    replace: bool,
) -> list[tuple[int, str, StreamBusError | None]]:
    """Each resource of an alter request checked, altered (or validated) and logged on its
    own: one resource's error leaves the others' changes standing, as in Kafka."""
    results: list[tuple[int, str, StreamBusError | None]] = []
    twice = _duplicate_resources(request)
    validate_only = bool(request.validate_only)
    for resource in request.resources:
        kind, name = int(resource.resource_type), str(resource.resource_name)
        error: StreamBusError | None = None
        try:
            _authorize(services, ctx, acls.ALTER_CONFIGS, kind, name)
            if (kind, name) in twice:
                raise InvalidRequestError(f"resource {name!r} appears more than once")
            _no_duplicates([c.name for c in resource.configs])
            changes = changes_of(kind, name, resource.configs)
            await _alter(
                services, kind, name, changes, replace=replace, validate_only=validate_only
            )
        except StreamBusError as exc:
            error = exc
        _logged(services, ctx, api, (kind, name), error=error, validate_only=validate_only)
        results.append((kind, name, error))
    return results


def _incremental(
    services: BrokerServices, kind: int, name: str, configs: Any
) -> dict[str, str | None]:
    """The SET/DELETE/APPEND/SUBTRACT operations as key -> new value (None: removed)."""
    changes: dict[str, str | None] = {}
    for config in configs:
        try:
            op = Op(int(config.config_operation))
        except ValueError:
            raise InvalidRequestError(
                f"config operation {config.config_operation} of {config.name} is unknown"
            ) from None
        if op is Op.SET:
            changes[config.name] = config.value
        elif op is Op.DELETE:
            changes[config.name] = None
        else:
            changes[config.name] = _list_op(
                services, kind, name, config.name, op=op, value=config.value
            )
    return changes


def _list_op(
    services: BrokerServices, kind: int, name: str, key: str, *, op: Op, value: str | None
) -> str:
    """APPEND or SUBTRACT on a LIST config, from its current value (override or default)."""
    topic_key = key if kind == Resource.TOPIC else BROKER_SYNONYMS.get(key)
    spec = SPECS.get(topic_key or "")
    if kind not in (Resource.TOPIC, Resource.BROKER) or spec is None:
        raise InvalidRequestError(f"config value {op.name.lower()} is not allowed for {key}")
    if spec.kind is not ConfigType.LIST:
        raise InvalidRequestError(f"config value {op.name.lower()} is not allowed for {key}")
    current: str | None
    if kind == Resource.TOPIC:
        topic = services.quorum.state.topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
        current = _effective(services, topic.configs)[key]
    else:
        current = _broker_chain(services, key, spec.name)[0][1]
    items = _list_value(current)
    given = _list_value(value)
    if op is Op.APPEND:
        items += [item for item in given if item not in items]
    else:
        items = [item for item in items if item not in given]
    return ",".join(items)


def _logged(
    services: BrokerServices,
    ctx: RequestContext,
    api: str,
    resource: tuple[int, str],
    *,
    error: StreamBusError | None,
    validate_only: bool,
) -> None:
    kind, name = resource
    what = f"{Resource(kind).name if kind in Resource._value2member_map_ else kind} {name!r}"
    if error is not None:
        services.telemetry.error(api, error.kafka_name)
        log.info("%s of %s from %s refused: %s", api, what, ctx.client_id, error)
    elif not validate_only:
        log.info("%s: configs of %s altered for %s", api, what, ctx.client_id)
