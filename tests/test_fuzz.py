"""Mutated frames of every served API: answered or refused, never a traceback.

Each frame starts as a valid request, built from the API's own schema at its
lowest, a middle and its highest served version, then gets one mutation: a
field set to null or to an oversized string or an extreme number (re-encoded,
so it reaches the broker exactly as a hostile client would write it), or its
bytes flipped, inserted, truncated or overwritten with 0x00 (a null compact
length). A fixed seed and a fixed number of frames keep every run the same.

Throughout, a canary producer (confluent-kafka) keeps writing to its own
topic; afterwards every record it had acknowledged must be readable, the
broker must answer, and its log must hold no traceback and no ERROR.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from kafka.protocol.admin import ListGroupsRequest
from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest
from kafka.protocol.schemas.fields.codecs import String

from streambus.protocol.apis import APIS
from streambus.storage.batch import build_batch
from tests.harness import BrokerThread, RawClient, wait_until

SEED = 20261214
FRAMES = 3000
REPLY_WAIT_S = 2.0  # a mutated long-poll may legitimately hold its connection; move on

# A field that decides how much the broker creates: mutations of it are left out,
# since partition-count limits are a resource question tested on their own.
_CREATION_SIZE_FIELDS = ("num_partitions", "assignments")

_INTS = {
    "acks": -1,
    "timeout_ms": 5000,
    "session_timeout_ms": 10000,
    "rebalance_timeout_ms": 1000,
    "transaction_timeout_ms": 60000,
    "max_wait_ms": 0,
    "min_bytes": 0,
    "max_bytes": 1 << 20,
    "partition_max_bytes": 1 << 20,
    "num_partitions": 1,
    "replication_factor": 1,
    "replica_id": -1,
    "generation_id": -1,
    "generation_id_or_member_epoch": -1,
    "timestamp": -1,
    "session_epoch": -1,
    "log_start_offset": -1,
    "current_leader_epoch": -1,
    "committed_leader_epoch": -1,
    "producer_id": -1,
    "producer_epoch": -1,
    "retention_time_ms": -1,
    "max_num_offsets": 1,
}
_EXTREMES = (-1, -(1 << 31), (1 << 31) - 1, 1 << 15, -(1 << 15))


def _string_value(name: str, i: int, api: str) -> str | None:
    if name in ("group_instance_id", "transactional_id", "protocol_name"):
        return None
    if name in ("group_id", "key") or name.endswith("group_id") or name == "groups":
        return f"fuzz-group-{i}"
    if name in ("name", "topic", "topic_names"):
        if api == "CreateTopics":
            return f"fuzz-new-{i}"
        if api == "DeleteTopics":
            return f"fuzz-gone-{i}"
        return "fuzz"
    if name == "protocol_type":
        return "consumer"
    if name in ("member_id", "rack_id", "rack"):
        return ""
    return "fuzz"


def _value(field: Any, version: int, i: int, api: str) -> Any:
    name = field.name
    if field.is_struct_array():
        if name in ("assignments", "configs", "forgotten_topics_data", "tags"):
            return []
        return [_struct(field.array_of, version, i, api)]
    if field.is_array():
        return [_value(field.array_of, version, i, api)]
    if field.is_struct():
        return _struct(field, version, i, api)
    kind = getattr(field, "_type", None)
    if isinstance(kind, String):
        return _string_value(name, i, api)
    if field.type_str == "records":
        return build_batch([(b"k", b"fuzz", [], int(time.time() * 1000))])
    if field.type_str == "bytes":
        return b""
    if field.type_str == "bool":
        return False
    if field.type_str == "uuid":
        return uuid.UUID(int=0)
    return _INTS.get(name, 0)


def _struct(struct: Any, version: int, i: int, api: str) -> Any:
    values = {f.name: _value(f, version, i, api) for f in struct.untagged_fields(version)}
    return struct.data_class(version=version, **values)


def _fields(struct: Any, version: int, obj: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(owner object, field, value) of every field reachable in ``obj``."""
    for field in struct.untagged_fields(version):
        value = getattr(obj, field.name)
        yield obj, field, value
        if field.is_struct_array() and value:
            for item in value:
                yield from _fields(field.array_of, version, item)
        elif field.is_struct() and value is not None:
            yield from _fields(field, version, value)


def _encode(request: Any, version: int, correlation_id: int) -> bytes:
    request.with_header(correlation_id=correlation_id, client_id="fuzzer")
    return bytes(request.encode(version=version, header=True, framed=False))


def _mutate(rng: random.Random, spec: Any, version: int, i: int) -> bytes | None:
    struct_ = spec.request._struct
    request = _struct(struct_, version, i, spec.name)
    request = spec.request(
        version=version,
        **{f.name: getattr(request, f.name) for f in struct_.untagged_fields(version)},
    )
    fields = list(_fields(struct_, version, request))
    kind = rng.randrange(7) if fields else rng.randrange(3, 7)
    if kind < 3:  # one field, re-encoded: null, oversized string or extreme number
        owner, field, value = rng.choice(fields)
        if kind == 0 and not field.is_struct():
            setattr(owner, field.name, None)
        elif kind == 1 and isinstance(value, str):
            setattr(owner, field.name, "s" * 40_000)
        elif kind == 2 and isinstance(value, int) and not isinstance(value, bool):
            if field.name in _CREATION_SIZE_FIELDS:
                return None
            setattr(owner, field.name, rng.choice(_EXTREMES))
        try:
            return _encode(request, version, i)
        except Exception:
            return None  # this version cannot even carry the value (int16 string lengths)
    frame = bytearray(_encode(request, version, i))
    lo = 8  # keep api key, version and correlation id: those paths are tested elsewhere
    if len(frame) <= lo:
        return bytes(frame)
    pos = rng.randrange(lo, len(frame))
    if kind == 3:
        for _ in range(rng.randint(1, 4)):
            frame[rng.randrange(lo, len(frame))] ^= rng.randrange(1, 256)
    elif kind == 4:
        frame[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif kind == 5:
        del frame[pos:]
    else:
        frame[pos] = 0  # a compact length of 0: null
    return bytes(frame)


def _creates_too_much(spec: Any, version: int, frame: bytes) -> bool:
    if spec.name != "CreateTopics":
        return False
    try:
        request = spec.request.decode(frame, version=version, header=True)
        return any(
            t.num_partitions > 10 or len(t.assignments or ()) > 10 for t in request.topics or ()
        )
    except Exception:
        return False


def _frames() -> Iterator[tuple[Any, int, bytes]]:
    rng = random.Random(SEED)
    plan = []
    for spec in sorted(APIS.values(), key=lambda s: s.key):
        middle = (spec.min_version + spec.max_version) // 2
        for version in sorted({spec.min_version, middle, spec.max_version}):
            plan.append((spec, version))
    produced = 0
    i = 0
    while produced < FRAMES:
        spec, version = plan[i % len(plan)]
        i += 1
        frame = _mutate(rng, spec, version, i)
        if frame is None or _creates_too_much(spec, version, frame):
            continue
        produced += 1
        yield spec, version, frame


class _Sender:
    """Sends each frame followed by an ApiVersions sentinel and reads up to the sentinel's reply,
    so frames that get no answer (acks=0, refusals) cost no waiting."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._client: RawClient | None = None
        self.closed = self.answered = self.stalled = 0

    def send(self, frame: bytes) -> None:
        if self._client is None:
            self._client = RawClient(self._bootstrap, timeout=REPLY_WAIT_S)
        client = self._client
        sentinel = ApiVersionsRequest()
        sentinel.with_header(correlation_id=-7, client_id="fuzzer")
        body = bytes(sentinel.encode(version=0, header=True, framed=True))
        try:
            client.send_bytes(struct.pack(">i", len(frame)) + frame + body)
            while True:
                reply = client.read_frame()
                if reply[:4] == struct.pack(">i", -7):
                    self.answered += 1
                    return
        except TimeoutError:
            self.stalled += 1
        except (ConnectionError, OSError):
            self.closed += 1
        client.close()
        self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _Canary:
    """A real producer writing to its own topic the whole time; remembers what was acknowledged."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        self.acked: list[bytes] = []
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(str(err))
        else:
            self.acked.append(msg.value())

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._producer.produce("canary", f"canary-{n}".encode(), on_delivery=self._delivered)
            n += 1
            self._producer.poll(0.02)
        self._producer.flush(10)

    def __enter__(self) -> _Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _consume_all(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "canary-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:

        def done() -> bool:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                seen.append(msg.value())
            return len(seen) >= expected

        wait_until(done, timeout=30, interval=0)
    finally:
        consumer.close()
    return seen


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerThread]:
    with BrokerThread(
        tmp_path / "data",
        group_initial_rebalance_delay_ms=0,
        shutdown_timeout_s=2.0,
        max_request_bytes=4 * 1024 * 1024,
    ) as b:
        b.run(b.broker.create_topic, "fuzz", 2, {})
        b.run(b.broker.create_topic, "canary", 1, {})
        yield b


def test_mutated_frames_of_every_api(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sender = _Sender(broker.bootstrap)
    apis: set[str] = set()
    with _Canary(broker.bootstrap) as canary:
        wait_until(lambda: canary.acked, timeout=30)
        try:
            for spec, _version, frame in _frames():
                apis.add(spec.name)
                sender.send(frame)
        finally:
            sender.close()
    assert apis == {spec.name for spec in APIS.values()}
    assert sender.answered > FRAMES // 2, (sender.answered, sender.closed, sender.stalled)

    broken = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not broken, [f"{r.name}: {r.getMessage()}" for r in broken[:5]]

    # alive, and the listing a 40,000-character group id used to break still encodes
    with RawClient(broker.bootstrap) as client:
        meta = client.request(MetadataRequest(topics=None, allow_auto_topic_creation=False), 9)
        assert "canary" in [t.name for t in meta.topics]
        for version in (0, 2, 4):
            assert client.request(ListGroupsRequest(), version).error_code == 0

    assert not canary.failed, canary.failed[:5]
    seen = _consume_all(broker.bootstrap, "canary", len(canary.acked))
    assert set(canary.acked) <= set(seen)
