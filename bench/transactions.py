"""Transactions: transactional produce and read_committed consume, StreamBus beside Kafka.

One broker per system on 127.0.0.1 (StreamBus: ``streambus serve`` with /metrics on and tracing
off; Kafka: ``bench.kafka``, one combined broker+controller node), a 3-partition topic, and the
same confluent-kafka client and settings on both:

* **Transactional produce**: one producer with a ``transactional.id`` (``linger.ms=5``,
  idempotence and ``acks=all`` as transactions require), 100-byte values, 100 records per
  transaction spread round-robin over the three partitions (so every commit writes three
  markers). Each transaction is ``begin_transaction()``, 100 ``produce()``, ``flush()``,
  ``commit_transaction()``. A few transactions warm up first. Reported: transactions/s and
  messages/s over the timed transactions (first ``begin_transaction()`` to the last commit
  returning), and the commit latency p50/p99: how long ``commit_transaction()`` took after the
  flush, i.e. AddPartitionsToTxn already done, the EndTxn round trip with the coordinator's
  PrepareCommit write, the markers and CompleteCommit (librdkafka returns when EndTxn is
  answered; Kafka answers EndTxn once PrepareCommit is durable, markers follow asynchronously).
* **read_committed consume**: a second topic gets a data set written in transactions of 1,000
  records, every 10th aborted (300,000 records in all; 100,000 quick). Three fresh consumers
  with ``isolation.level=read_committed``, one after the other, each assigned every partition
  from the beginning (no group), read every committed record (the aborted ones and the markers
  take offsets but are not delivered); messages/s over the three reads, each timed from
  ``assign()`` to its last record; an aborted record delivered fails the run. The same with
  ``read_uncommitted`` (every record, aborted ones included) for comparison.

When StreamBus refuses a transactional producer (InitProducerId with a transactional id, or
FindCoordinator for key type TRANSACTION), its rows are skipped with the broker's answer.
Results go to ``bench/results/transactions.json``; goals are not asserted.

    .venv/bin/python -m bench.transactions [--quick] [--no-kafka] [--no-streambus]
"""

from __future__ import annotations

import argparse
import functools
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kafka.errors
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)
from kafka.protocol.metadata.find_coordinator import FindCoordinatorRequest
from kafka.protocol.producer.transaction import InitProducerIdRequest

from bench.common import ROOT, machine_info, run_and_report
from bench.kafka import ensure_kafka, running_kafka
from bench.streambus_server import StreamBusServer
from bench.wire import RawClient
from bench.workloads import (
    Delivery,
    consumer_config,
    create_topics,
    percentile,
    quiet_gc,
    settle_page_cache,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "transactions.json"
DEFAULT_LOG_DIR = ROOT / "bench" / "results" / "logs" / "transactions"
PARTITIONS = 3
VALUE_BYTES = 100
RECORDS_PER_TXN = 100
WARMUP_TXNS = 10
INIT_TIMEOUT_S = 30.0
TXN_TIMEOUT_S = 60.0
CONSUME_TIMEOUT_S = 180.0
LINGER_MS = 5
CONSUME_PASSES = 3
CONSUME_TXN_RECORDS = 1000  # records per transaction of the consume data set
ABORT_EVERY = 10  # every 10th transaction of that set is aborted
COMMITTED_VALUE = b"c" * VALUE_BYTES
ABORTED_VALUE = b"a" * VALUE_BYTES  # a read_committed reader seeing one is an error


@dataclass(frozen=True)
class Plan:
    name: str
    transactions: int  # timed, after the warm-up
    consume_records: int  # written for the read_committed run, aborted ones included


FULL = Plan("full", 1000, 300_000)
QUICK = Plan("quick", 200, 100_000)


class TransactionsRefusedError(Exception):
    """The broker would not give a transactional producer its id."""


@dataclass
class Row:
    system: str
    workload: str
    messages: int
    seconds: float
    msgs_per_s: float
    txns_per_s: float | None = None
    commit_p50_ms: float | None = None
    commit_p99_ms: float | None = None
    txn_p50_ms: float | None = None  # begin_transaction() to commit_transaction() returning
    txn_p99_ms: float | None = None
    note: str = ""


@dataclass
class Result:
    plan: str
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# -- the workloads ----------------------------------------------------------------------------


def transactional_producer(bootstrap: str, transactional_id: str) -> Producer:
    """A producer with its transactional id registered (``init_transactions``); raises
    :class:`TransactionsRefusedError` with the client's report of the broker's answer."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": int(TXN_TIMEOUT_S * 1000),
            "linger.ms": LINGER_MS,
        }
    )
    try:
        producer.init_transactions(INIT_TIMEOUT_S)
    except KafkaException as exc:
        err = exc.args[0]
        raise TransactionsRefusedError(
            f"client: {err.name()}: {err.str()}; broker: {broker_answers(bootstrap)}"
        ) from None
    return producer


def broker_answers(bootstrap: str) -> str:
    """What the broker itself answers FindCoordinator(TRANSACTION) and InitProducerId with a
    transactional id, asked with raw frames (the client's error after a refusal is often only
    its own timeout)."""
    txn_id = f"bench-probe-{secrets.token_hex(4)}"
    answers = []
    try:
        with RawClient(bootstrap, timeout=10) as client:
            found = client.request(FindCoordinatorRequest(key=txn_id, key_type=1), 2)
            answers.append(
                f"FindCoordinator(TRANSACTION) -> {_error_name(found.error_code)}"
                + (f" ({found.error_message})" if found.error_message else "")
            )
            init = client.request(
                InitProducerIdRequest(transactional_id=txn_id, transaction_timeout_ms=60_000), 1
            )
            answers.append(f"InitProducerId(transactional_id) -> {_error_name(init.error_code)}")
    except (OSError, ValueError) as exc:
        answers.append(f"probe failed: {type(exc).__name__}: {exc}")
    return "; ".join(answers)


def _error_name(code: int) -> str:
    if code == 0:
        return "NONE"
    return f"{kafka.errors.for_code(code).__name__} ({code})"


def _one_transaction(
    producer: Producer, topic: str, value: bytes, delivery: Delivery, seq: int
) -> tuple[float, float]:
    """One committed transaction of RECORDS_PER_TXN records; (the whole transaction's
    seconds, the commit's seconds)."""
    begun = time.perf_counter()
    producer.begin_transaction()
    for i in range(RECORDS_PER_TXN):
        producer.produce(topic, value, partition=(seq + i) % PARTITIONS, on_delivery=delivery)
    producer.flush(TXN_TIMEOUT_S)
    started = time.perf_counter()
    producer.commit_transaction(TXN_TIMEOUT_S)
    done = time.perf_counter()
    return done - begun, done - started


def transactional_produce(bootstrap: str, topic: str, transactions: int) -> Row:
    """Warm-up plus ``transactions`` timed transactions."""
    producer = transactional_producer(bootstrap, f"bench-txn-{secrets.token_hex(4)}")
    value = b"x" * VALUE_BYTES
    delivery = Delivery(keep_latency=False)
    for seq in range(WARMUP_TXNS):
        _one_transaction(producer, topic, value, delivery, seq)
    commits: list[float] = []
    whole: list[float] = []
    with quiet_gc():
        started = time.perf_counter()
        for seq in range(WARMUP_TXNS, WARMUP_TXNS + transactions):
            txn_s, commit_s = _one_transaction(producer, topic, value, delivery, seq)
            whole.append(txn_s)
            commits.append(commit_s)
        seconds = time.perf_counter() - started
    producer.flush(TXN_TIMEOUT_S)
    total = (WARMUP_TXNS + transactions) * RECORDS_PER_TXN
    delivery.check("transactional produce", total)
    commits.sort()
    whole.sort()
    messages = transactions * RECORDS_PER_TXN
    return Row(
        "",
        "transactional produce",
        messages,
        seconds,
        messages / seconds,
        txns_per_s=transactions / seconds,
        commit_p50_ms=percentile(commits, 0.5) * 1000,
        commit_p99_ms=percentile(commits, 0.99) * 1000,
        txn_p50_ms=percentile(whole, 0.5) * 1000,
        txn_p99_ms=percentile(whole, 0.99) * 1000,
        note=f"{RECORDS_PER_TXN} x {VALUE_BYTES} B per transaction over {PARTITIONS} partitions",
    )


def _read_pass(bootstrap: str, topic: str, expected: int, isolation: str) -> float:
    """One fresh consumer reads all ``expected`` records; its seconds, from ``assign()`` to
    the last record."""
    consumer = Consumer({**consumer_config(bootstrap), "isolation.level": isolation})
    got = 0
    try:
        started = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while got < expected:
            batch = consumer.consume(num_messages=min(10_000, expected - got), timeout=1.0)
            for msg in batch:
                err = msg.error()
                if err is not None:
                    raise KafkaException(err)
                if isolation == "read_committed" and msg.value() == ABORTED_VALUE:
                    raise RuntimeError(f"{topic}: read_committed delivered an aborted record")
            got += len(batch)
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {got}/{expected} in {CONSUME_TIMEOUT_S:.0f}s")
        return time.perf_counter() - started
    finally:
        consumer.close()


def consume(bootstrap: str, topic: str, expected: int, isolation: str) -> Row:
    """CONSUME_PASSES fresh consumers of ``isolation`` level, one after the other, each
    reading the ``expected`` records it sees; the rate over all passes."""
    settle_page_cache()
    messages = 0
    seconds = 0.0
    with quiet_gc():
        for _ in range(CONSUME_PASSES):
            seconds += _read_pass(bootstrap, topic, expected, isolation)
            messages += expected
    return Row(
        "",
        f"{isolation} consume",
        messages,
        seconds,
        messages / seconds,
        note=f"{CONSUME_PASSES} passes over the {expected} records it sees",
    )


def write_consume_set(bootstrap: str, topic: str, records: int) -> tuple[int, int]:
    """``records`` records in transactions of CONSUME_TXN_RECORDS, every ABORT_EVERY-th one
    aborted (so read_committed readers skip aborted data); (committed, aborted) records."""
    producer = transactional_producer(bootstrap, f"bench-txn-set-{secrets.token_hex(4)}")
    delivery = Delivery(keep_latency=False)
    committed = aborted = 0
    for txn in range(max(1, records // CONSUME_TXN_RECORDS)):
        abort = txn % ABORT_EVERY == ABORT_EVERY - 1
        value = ABORTED_VALUE if abort else COMMITTED_VALUE
        producer.begin_transaction()
        for i in range(CONSUME_TXN_RECORDS):
            producer.produce(topic, value, partition=i % PARTITIONS, on_delivery=delivery)
        producer.flush(TXN_TIMEOUT_S)
        if abort:
            producer.abort_transaction(TXN_TIMEOUT_S)
            aborted += CONSUME_TXN_RECORDS
        else:
            producer.commit_transaction(TXN_TIMEOUT_S)
            committed += CONSUME_TXN_RECORDS
    delivery.check("consume data set", committed + aborted)
    return committed, aborted


def measure(system: str, bootstrap: str, plan: Plan, result: Result) -> None:
    """Both workloads on one started broker; rows appended to ``result``."""
    topic = f"txn-{secrets.token_hex(3)}"
    create_topics(bootstrap, [topic], PARTITIONS)
    settle_page_cache()
    produce = transactional_produce(bootstrap, topic, plan.transactions)
    produce.system = system
    result.rows.append(produce)
    print(f"  {format_row(produce)}", flush=True)
    topic = f"txn-read-{secrets.token_hex(3)}"
    create_topics(bootstrap, [topic], PARTITIONS)
    committed, aborted = write_consume_set(bootstrap, topic, plan.consume_records)
    for isolation, expected in (
        ("read_committed", committed),
        ("read_uncommitted", committed + aborted),
    ):
        row = consume(bootstrap, topic, expected, isolation)
        row.system = system
        row.note += f"; the topic: {committed} committed, {aborted} aborted"
        result.rows.append(row)
        print(f"  {format_row(row)}", flush=True)


def run_kafka(plan: Plan, result: Result, work_dir: Path | None, log_dir: Path) -> None:
    home = ensure_kafka()
    with running_kafka(home, work_dir, log_dir / "kafka.log") as server:
        print(f"kafka {home.version}: ready in {server.start_seconds:.1f}s", flush=True)
        measure("kafka", server.bootstrap, plan, result)
        server.stop()


def run_streambus(plan: Plan, result: Result, work_dir: Path | None, log_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-streambus-txn-", dir=work_dir) as tmp:
        server = StreamBusServer(Path(tmp), "metrics")
        try:
            server.start()
            print(f"streambus: ready in {server.start_seconds:.1f}s", flush=True)
            try:
                measure("streambus", server.bootstrap, plan, result)
            except TransactionsRefusedError as exc:
                reason = f"transactional producer refused ({exc})"
                result.skipped["streambus"] = reason
                print(f"  streambus: SKIPPED: {reason}", flush=True)
            server.stop()
        finally:
            server.kill()
            server.keep_log(log_dir / "streambus.log")


# -- output -----------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_row(row: Row) -> str:
    txns = "" if row.txns_per_s is None else f"{row.txns_per_s:>8,.0f} txn/s "
    commit = (
        ""
        if row.commit_p50_ms is None
        else f"commit p50 {_ms(row.commit_p50_ms)} ms p99 {_ms(row.commit_p99_ms)} ms "
        f"(whole txn p50 {_ms(row.txn_p50_ms)} ms p99 {_ms(row.txn_p99_ms)} ms) "
    )
    return (
        f"{row.system:<10} {row.workload:<26} {row.msgs_per_s:>10,.0f} msg/s {txns}{commit}"
        f"({row.messages} msgs in {row.seconds:.2f}s; {row.note})"
    )


def render(result: Result) -> str:
    lines = [
        f"transactions benchmark ({result.plan}): one broker per system on 127.0.0.1, "
        f"{RECORDS_PER_TXN} x {VALUE_BYTES} B records per transaction, {PARTITIONS} partitions",
        "",
    ]
    lines += [format_row(r) for r in result.rows]
    for system, reason in result.skipped.items():
        lines.append(f"{system:<10} SKIPPED: {reason}")
    rates: dict[tuple[str, str], float] = {
        (r.system, r.workload): r.msgs_per_s for r in result.rows
    }
    for workload in ("transactional produce", "read_committed consume", "read_uncommitted consume"):
        sb, kafka = rates.get(("streambus", workload)), rates.get(("kafka", workload))
        if sb and kafka:
            lines.append(f"streambus/kafka {workload} ratio: {sb / kafka:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transactions", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer transactions")
    parser.add_argument("--transactions", type=int, help="timed transactions (overrides plan)")
    parser.add_argument("--no-kafka", action="store_true", help="StreamBus only")
    parser.add_argument("--no-streambus", action="store_true", help="Kafka only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work-dir", type=Path, help="parent of the brokers' data directories")
    parser.add_argument("--log-dir", type=Path, default=DEFAULT_LOG_DIR)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.transactions:
        plan = Plan(
            f"{plan.name}, {args.transactions} transactions",
            args.transactions,
            plan.consume_records,
        )
    result = Result(plan.name, machine_info())
    runs = []
    if not args.no_streambus:
        runs.append(("streambus", run_streambus))
    if not args.no_kafka:
        runs.append(("kafka", run_kafka))
    return run_and_report(
        [
            (system, functools.partial(run, plan, result, args.work_dir, args.log_dir))
            for system, run in runs
        ],
        result,
        render,
        args.out,
        args.log_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
