"""Kafka's transactions: the coordinator, its ``__transaction_state`` records, the markers."""

from streambus.transactions.coordinator import TransactionCoordinator, TxnSettings
from streambus.transactions.markers import Leader, Marker, MarkerWriter
from streambus.transactions.state import (
    TRANSACTION_TOPIC,
    TRANSACTION_TOPIC_CONFIG,
    TransactionMetadata,
    TxnState,
)

__all__ = [
    "TRANSACTION_TOPIC",
    "TRANSACTION_TOPIC_CONFIG",
    "Leader",
    "Marker",
    "MarkerWriter",
    "TransactionCoordinator",
    "TransactionMetadata",
    "TxnSettings",
    "TxnState",
]
