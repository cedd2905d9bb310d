"""Consumer-group members of each client library, driven from a thread of their own.

A member polls, records each message only after its offset commit succeeded
(so a message is "read" exactly when the group has moved past it), and
reports its current assignment. Runnable as a script (one confluent-kafka
member printing what it reads) for tests that SIGKILL a member.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any


class Member(threading.Thread):
    """Base: subclasses open a client, poll a batch, commit it, report the assignment, close."""

    def __init__(self, bootstrap: str, group: str, topic: str, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.read: list[tuple[int, int, bytes]] = []
        self.assigned: set[int] = set()
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.closed = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
        finally:
            self.closed.set()

    def work(self) -> None:
        raise NotImplementedError


class ConfluentMember(Member):
    def work(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 300,
                "log.connection.close": False,
            }
        )

        def on_assign(_c: Any, partitions: list[Any]) -> None:
            self.assigned = {p.partition for p in partitions}

        def on_revoke(_c: Any, _partitions: list[Any]) -> None:
            self.assigned = set()

        consumer.subscribe([self.topic], on_assign=on_assign, on_revoke=on_revoke)
        while not self._stop_event.is_set():
            messages = [m for m in consumer.consume(100, 0.2) if m.error() is None]
            if not messages:
                continue
            try:
                consumer.commit(asynchronous=False)
            except KafkaException:
                continue  # a rebalance took the partitions: their next owner reads these
            self.read.extend((m.partition(), m.offset(), m.value()) for m in messages)
        consumer.close()  # commits nothing more (auto commit is off) and sends LeaveGroup


class KafkaPythonMember(Member):
    def work(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import CommitFailedError, KafkaError

        consumer = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=300,
        )
        while not self._stop_event.is_set():
            batch = consumer.poll(200)
            self.assigned = {tp.partition for tp in consumer.assignment()}
            records = [r for rs in batch.values() for r in rs]
            if not records:
                continue
            try:
                consumer.commit()
            except (CommitFailedError, KafkaError):
                continue
            self.read.extend((r.partition, r.offset, r.value) for r in records)
        consumer.close()


class AiokafkaMember(Member):
    def work(self) -> None:
        asyncio.run(self._work())

    async def _work(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import CommitFailedError, KafkaError

        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=300,
        )
        await consumer.start()
        try:
            while not self._stop_event.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                self.assigned = {tp.partition for tp in consumer.assignment()}
                records = [r for rs in batch.values() for r in rs]
                if not records:
                    continue
                try:
                    await consumer.commit()
                except (CommitFailedError, KafkaError):
                    continue
                self.read.extend((r.partition, r.offset, r.value) for r in records)
        finally:
            await consumer.stop()


MEMBERS: dict[str, type[Member]] = {
    "confluent-kafka": ConfluentMember,
    "kafka-python": KafkaPythonMember,
    "aiokafka": AiokafkaMember,
}


def wait_stable(members: list[Member], partitions: int, timeout: float = 45) -> float:
    """Seconds until the members hold disjoint non-empty assignments covering every partition."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for m in members:
            if m.error is not None:
                raise m.error
        sets = [m.assigned for m in members]
        union = set().union(*sets)
        if all(sets) and len(union) == partitions and sum(len(s) for s in sets) == partitions:
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(f"no stable assignment: {[sorted(m.assigned) for m in members]}")


def main() -> None:
    """One confluent-kafka member: prints ASSIGNED and READ lines, flushed, until killed."""
    from confluent_kafka import Consumer

    bootstrap, group, topic = sys.argv[1:4]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 3000,
            "heartbeat.interval.ms": 300,
            "log.connection.close": False,
        }
    )

    def on_assign(_c: Any, partitions: list[Any]) -> None:
        print("ASSIGNED " + ",".join(str(p.partition) for p in partitions), flush=True)

    consumer.subscribe([topic], on_assign=on_assign)
    while True:
        messages = [m for m in consumer.consume(100, 0.2) if m.error() is None]
        if messages:
            consumer.commit(asynchronous=False)
            for m in messages:
                print(f"READ {m.partition()} {m.offset()} {m.value().decode()}", flush=True)


if __name__ == "__main__":
    main()
