"""The transaction coordinator's own parts: the ``__transaction_state`` codec, the state
machine, and its durability across a restart (a transaction found prepared is finished
by the next start), driven on a real broker without clients."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path
from typing import Any

import pytest

from streambus.errors import (
    ConcurrentTransactionsError,
    InvalidProducerIdMappingError,
    InvalidTransactionTimeoutError,
    InvalidTxnStateError,
    ProducerFencedError,
)
from streambus.structs import TopicPartition
from streambus.transactions import TransactionMetadata, TxnState
from streambus.transactions.state import (
    decode_key,
    decode_value,
    encode_key,
    encode_value,
    valid_transition,
)
from tests.harness import BrokerThread, wait_until


def test_key_and_value_use_kafkas_layout() -> None:
    key = encode_key("my-txn")
    assert key == struct.pack(">hh", 0, 6) + b"my-txn"
    assert decode_key(key) == "my-txn"
    meta = TransactionMetadata(
        "my-txn",
        producer_id=4001,
        producer_epoch=3,
        timeout_ms=60_000,
        state=TxnState.ONGOING,
        partitions={TopicPartition("b", 1), TopicPartition("a", 0), TopicPartition("a", 2)},
        start_ms=1_700_000_000_000,
        last_update_ms=1_700_000_000_500,
    )
    value = encode_value(meta)
    # version, producer id, epoch, timeout, state; then 2 topics: "a" [0, 2], "b" [1]
    assert value[:17] == struct.pack(">hqhib", 0, 4001, 3, 60_000, 1)
    assert value[17:21] == struct.pack(">i", 2)
    assert value[21:24] == struct.pack(">h", 1) + b"a"
    assert value[24:36] == struct.pack(">iii", 2, 0, 2)
    assert value[-16:] == struct.pack(">qq", 1_700_000_000_500, 1_700_000_000_000)
    decoded = decode_value("my-txn", value)
    assert (decoded.producer_id, decoded.producer_epoch, decoded.timeout_ms) == (4001, 3, 60_000)
    assert decoded.state is TxnState.ONGOING
    assert decoded.partitions == meta.partitions
    assert (decoded.start_ms, decoded.last_update_ms) == (meta.start_ms, meta.last_update_ms)
    with pytest.raises(ValueError, match="version"):
        decode_value("my-txn", struct.pack(">h", 9) + value[2:])


def test_state_names_and_transitions() -> None:
    assert [s.kafka_name for s in TxnState] == [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
        "Dead",
        "PrepareEpochFence",
    ]
    assert valid_transition(TxnState.ONGOING, TxnState.PREPARE_COMMIT)
    assert valid_transition(TxnState.COMPLETE_ABORT, TxnState.ONGOING)
    assert not valid_transition(TxnState.EMPTY, TxnState.PREPARE_COMMIT)
    assert not valid_transition(TxnState.PREPARE_COMMIT, TxnState.COMPLETE_ABORT)
    assert not valid_transition(TxnState.PREPARE_ABORT, TxnState.ONGOING)


def _broker(path: Path) -> BrokerThread:
    return BrokerThread(path, metrics=False, transaction_state_log_num_partitions=3)


def test_coordinator_answers_and_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tp = TopicPartition("work", 0)
    with _broker(data) as b:
        b.call(b.broker.create_cluster_topic("work", 1, {}))
        b.call(b.broker.ensure_transaction_topic())
        txn = b.broker.transactions
        with pytest.raises(InvalidTransactionTimeoutError):
            b.call(txn.init_producer_id("t1", 900_001))
        pid, epoch = b.call(txn.init_producer_id("t1", 60_000))
        with pytest.raises(InvalidProducerIdMappingError):
            b.call(txn.add_partitions("t1", pid + 1, epoch, [tp]))
        with pytest.raises(InvalidTxnStateError):
            b.call(txn.end_transaction("t1", pid, epoch, True))
        b.call(txn.add_partitions("t1", pid, epoch, [tp]))
        with pytest.raises(ProducerFencedError):
            b.call(txn.add_partitions("t1", pid, epoch - 1 if epoch else epoch + 5, [tp]))
        assert b.run(txn.describe, "t1").state is TxnState.ONGOING

        # Markers that cannot be written (a leader away): EndTxn answers once its wait is
        # over, the id stays PrepareCommit and answers CONCURRENT_TRANSACTIONS meanwhile.
        blocked = asyncio.Event()

        async def never(*_: Any) -> None:
            blocked.set()
            await asyncio.Event().wait()

        txn.settings = dataclasses.replace(txn.settings, end_wait_s=0.2)
        txn.markers.write = never  # type: ignore[method-assign]
        b.call(txn.end_transaction("t1", pid, epoch, True))
        assert b.run(txn.describe, "t1").state is TxnState.PREPARE_COMMIT
        with pytest.raises(ConcurrentTransactionsError):
            b.call(txn.add_partitions("t1", pid, epoch, [tp]))
        end_before = b.run(lambda: b.broker.partitions.offsets(tp).high_watermark)
        assert end_before == 0

    # The next start reads PrepareCommit back and finishes it: the marker, then CompleteCommit.
    with _broker(data) as b:
        txn = b.broker.transactions

        def completed() -> bool:
            meta = b.run(txn.describe, "t1")
            return meta is not None and meta.state is TxnState.COMPLETE_COMMIT

        wait_until(completed, timeout=15)
        assert b.run(lambda: b.broker.partitions.offsets(tp).high_watermark) == 1
        meta = b.run(txn.describe, "t1")
        assert (meta.producer_id, meta.producer_epoch) == (pid, epoch)
        # The same id gets the next epoch; the one before it is fenced.
        assert b.call(txn.init_producer_id("t1", 60_000)) == (pid, epoch + 1)
        with pytest.raises(ProducerFencedError):
            b.call(txn.add_partitions("t1", pid, epoch, [tp]))
