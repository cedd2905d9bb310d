"""StreamBus: a Kafka-protocol streaming broker, instrumented end to end with OpenTelemetry.

The public surface is small: run a :class:`Broker` with a :class:`BrokerConfig`
(or ``streambus serve``); everything else is implementation.
"""

from streambus.broker import Broker, BrokerStatus
from streambus.config import BrokerConfig
from streambus.errors import StreamBusError
from streambus.structs import TopicPartition
from streambus.topic_config import CleanupPolicy, TopicConfig

__all__ = [  # noqa: RUF022 - grouped by what a user does with them
    # running a broker
    "Broker",
    "BrokerConfig",
    "BrokerStatus",
    # topics
    "CleanupPolicy",
    "TopicConfig",
    "TopicPartition",
    # errors
    "StreamBusError",
]
