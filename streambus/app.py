"""The composition root of the Kafka front end: the API table and the server serving it.

The one module that imports every handler module. Handlers depend on the
``BrokerServices`` Protocol only and the server on the table it is given, so
neither imports the broker; the broker asks this module for its server.
Layers, top to bottom (an import points down only; tests/test_architecture.py
keeps it so)::

    broker ─► app ─► server ─► protocol.apis ─► protocol.context (BrokerServices)
                 └─► protocol.{acls,admin,client_quotas,configs,fetch,groups,metadata,produce}
    broker, protocol ─► partitions ─► storage ─► records
                        groups ─┘
"""

from __future__ import annotations

from streambus.config import BrokerConfig
from streambus.protocol import (
    acls,
    admin,
    admin_data,
    client_quotas,
    configs,
    consumer_groups,
    fetch,
    groups,
    metadata,
    produce,
    replication,
    sasl,
    scram_admin,
    transactions,
)
from streambus.protocol.apis import ApiSpec, build_table
from streambus.protocol.context import BrokerServices
from streambus.server import KafkaServer

# One handler per Kafka API key, each module declaring its own.
APIS: dict[int, ApiSpec] = build_table(
    metadata.routes,
    produce.routes,
    fetch.routes,
    replication.routes,
    admin.routes,
    configs.routes,
    admin_data.routes,
    groups.routes,
    consumer_groups.routes,
    transactions.routes,
    client_quotas.routes,
    acls.routes,
    sasl.routes,
    scram_admin.routes,
)


def build_server(services: BrokerServices, config: BrokerConfig) -> KafkaServer:
    """The Kafka server for ``services``, serving every API StreamBus implements."""
    return KafkaServer(services, config, APIS)
