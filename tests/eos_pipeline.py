"""An exactly-once consume-transform-produce pipeline, run by tests/test_eos.py as a child
process that the test SIGKILLs at random points and starts again with the same transactional id.

It reads the input topic with a read_committed consumer (assigned every partition, starting
at its group's committed offsets), upper-cases each value, and writes it to the same partition
of the output topic with two headers carrying where it came from (``in-partition``,
``in-offset``). Each batch is one transaction: the output records and the consumer's next
offsets (``send_offsets_to_transaction``) commit together or not at all.

    python tests/eos_pipeline.py BOOTSTRAP INPUT OUTPUT GROUP TRANSACTIONAL_ID [--batch N]
        [--work-ms MS] [--exit-at-end]

It prints one line per committed transaction (``committed <n> records``) so the test can
wait for progress before it kills; ``--exit-at-end`` makes it exit 0 once it has committed
every input record there is (the test's last run).
"""

from __future__ import annotations

import argparse
import sys
import time

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

TIMEOUT_S = 60.0
RETRIABLE = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.UNSTABLE_OFFSET_COMMIT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def committed_positions(consumer: Consumer, topic: str, partitions: int) -> list[TopicPartition]:
    """Where this group left off in each input partition (the beginning if nowhere yet).
    Retried while the group's coordinator moves or loads, or offsets wait for a marker."""
    wanted = [TopicPartition(topic, p) for p in range(partitions)]
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            found = consumer.committed(wanted, timeout=TIMEOUT_S)
            break
        except KafkaException as exc:
            if exc.args[0].code() not in RETRIABLE or time.monotonic() > deadline:
                raise
            print(f"committed offsets: {exc.args[0].name()}; retrying", flush=True)
            time.sleep(0.2)
    out = []
    for tp in found:
        if tp.error is not None:
            raise KafkaException(tp.error)
        offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
        out.append(TopicPartition(topic, tp.partition, offset))
    return out


def at_end(consumer: Consumer, next_offsets: dict[int, int], topic: str, partitions: int) -> bool:
    """True when every input partition has been consumed up to its high watermark."""
    for p in range(partitions):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT_S)
        if next_offsets.get(p, 0) < high:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("group")
    parser.add_argument("transactional_id")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--exit-at-end", action="store_true")
    # Time spent "transforming" after the records are sent, before the commit: it widens the
    # window in which a kill leaves records written but their transaction open.
    parser.add_argument("--work-ms", type=float, default=0.0)
    args = parser.parse_args()

    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "transactional.id": args.transactional_id,
            "transaction.timeout.ms": 60_000,
            "linger.ms": 5,
        }
    )
    # First: fence the previous incarnation and have its open transaction aborted, so the
    # committed offsets read next are final.
    producer.init_transactions(TIMEOUT_S)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    meta = consumer.list_topics(args.input, timeout=TIMEOUT_S).topics[args.input]
    partitions = len(meta.partitions)
    start = committed_positions(consumer, args.input, partitions)
    consumer.assign(start)
    next_offsets = {tp.partition: max(tp.offset, 0) for tp in start}
    print(f"started at {sorted(next_offsets.items())}", flush=True)
    transactions = 0
    while True:
        batch: list[Message] = consumer.consume(num_messages=args.batch, timeout=0.5)
        records = []
        for msg in batch:
            err = msg.error()
            if err is not None:
                raise KafkaException(err)
            records.append(msg)
        if not records:
            if args.exit_at_end and at_end(consumer, next_offsets, args.input, partitions):
                print(f"done after {transactions} transactions", flush=True)
                break
            continue
        producer.begin_transaction()
        for msg in records:
            value = msg.value()
            assert value is not None
            producer.produce(
                args.output,
                value.upper(),
                key=msg.key(),
                partition=msg.partition(),
                headers=[
                    ("in-partition", str(msg.partition()).encode()),
                    ("in-offset", str(msg.offset()).encode()),
                ],
            )
            next_offsets[msg.partition()] = msg.offset() + 1
        if args.work_ms:
            producer.flush(TIMEOUT_S)
            time.sleep(args.work_ms / 1000)
        offsets = [TopicPartition(args.input, p, o) for p, o in sorted(next_offsets.items())]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), TIMEOUT_S)
        producer.commit_transaction(TIMEOUT_S)
        transactions += 1
        print(f"committed {len(records)} records at {time.time():.3f}", flush=True)
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
