"""A Confluent-compatible schema registry, stored in the broker's own ``_schemas`` topic.

``registry`` holds the operations, ``store`` the in-memory state, ``storage`` the
records in ``_schemas``, ``formats`` (with ``json_format`` and ``protobuf_format``)
each format's parsing and rules, ``compatibility`` the levels, ``rest`` the HTTP API.
"""

from streambus.schemas.formats import RegisteredSchema, SchemaReference
from streambus.schemas.registry import SchemaRegistry
from streambus.schemas.rest import RegistryServer
from streambus.schemas.storage import SCHEMAS_TOPIC, SCHEMAS_TOPIC_CONFIG

__all__ = [
    "SCHEMAS_TOPIC",
    "SCHEMAS_TOPIC_CONFIG",
    "RegisteredSchema",
    "RegistryServer",
    "SchemaReference",
    "SchemaRegistry",
]
