"""Raw Kafka frames for the hostile and stall benchmarks: a bare socket client, record batches.

Requests are built with kafka-python's message classes (generated from Kafka's JSON specs),
the same ones the broker decodes with; record batches (format v2) are built here, so that a
benchmark never leans on the broker's own code for the bytes it sends.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import struct
import time
import zlib
from collections.abc import Iterable
from typing import Any

import crc32c

FRAME_SIZE = struct.Struct(">i")
# Batch header up to the CRC, then the part the CRC-32C covers (see streambus/storage/batch.py).
_PRE_CRC = struct.Struct(">qiib")  # baseOffset, batchLength, partitionLeaderEpoch, magic
_POST_CRC = struct.Struct(">hiqqqhii")  # attributes .. recordsCount
GZIP = 1
INT32_MAX = 2**31 - 1


def _varint(value: int) -> bytes:
    value = (value << 1) ^ (value >> 63)  # zigzag
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def record(key: bytes | None, value: bytes | None, offset_delta: int = 0) -> bytes:
    """One record (no headers, timestamp delta 0)."""
    body = bytearray(b"\x00")  # attributes
    body += _varint(0) + _varint(offset_delta)
    for field in (key, value):
        body += _varint(-1) if field is None else _varint(len(field)) + field
    body += _varint(0)
    return _varint(len(body)) + bytes(body)


def batch(records_section: bytes, count: int, *, attributes: int = 0) -> bytes:
    """A v2 batch around an already encoded (and maybe compressed) records section."""
    now_ms = int(time.time() * 1000)
    post = _POST_CRC.pack(attributes, count - 1, now_ms, now_ms, -1, -1, -1, count)
    crc = crc32c.crc32c(post + records_section)
    length = 4 + 1 + 4 + len(post) + len(records_section)  # epoch, magic, crc, rest
    return _PRE_CRC.pack(0, length, -1, 2) + struct.pack(">I", crc) + post + records_section


def simple_batch(values: Iterable[tuple[bytes | None, bytes | None]]) -> bytes:
    """An uncompressed batch of (key, value) records."""
    items = list(values)
    section = b"".join(record(k, v, i) for i, (k, v) in enumerate(items))
    return batch(section, len(items))


def gzip_bomb(inflated_bytes: int, step: int = 1 << 20) -> bytes:
    """A gzip batch of one record whose value is ``inflated_bytes`` zero bytes: about a
    thousandth of that on the wire. Compressed in steps, so the client never holds it whole."""
    value_len = inflated_bytes
    head = bytearray(b"\x00") + _varint(0) + _varint(0) + _varint(-1) + _varint(value_len)
    tail = _varint(0)
    body_len = len(head) + value_len + len(tail)
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    out = [gz.compress(_varint(body_len) + bytes(head))]
    zeros = bytes(step)
    left = value_len
    while left > 0:
        out.append(gz.compress(zeros[: min(step, left)]))
        left -= step
    out.append(gz.compress(tail))
    out.append(gz.flush())
    return batch(b"".join(out), 1, attributes=GZIP)


def api_versions_frame(correlation_id: int = 1, client_id: bytes = b"stall-probe") -> bytes:
    """ApiVersions v0: the cheapest request every Kafka broker answers."""
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    return FRAME_SIZE.pack(len(body)) + body


def encode(request: Any, version: int, correlation_id: int = 1, client_id: str = "bench") -> bytes:
    """The framed bytes of a kafka-python request object."""
    request.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(request.encode(version=version, header=True, framed=True))


def response_class(request: Any) -> Any:
    cls = type(request)
    module = importlib.import_module(cls.__module__)
    return getattr(module, cls.__name__.split("_v")[0].replace("Request", "Response"))


class RawClient:
    """A bare Kafka protocol connection: exactly the bytes a benchmark wants, read back whole."""

    def __init__(self, bootstrap: str, timeout: float = 30.0, rcvbuf: int = 0) -> None:
        host, port = bootstrap.rsplit(":", 1)
        self.sock = socket.socket()
        if rcvbuf:  # before connect, so the window is small from the first byte
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self._correlation = 0
        self.first_byte_at = 0.0  # perf_counter when the last response's first byte came

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, request: Any, version: int) -> Any:
        """Send ``request`` and decode its response."""
        self._correlation += 1
        self.send(encode(request, version, self._correlation))
        frame = self.read_frame()
        return response_class(request).decode(frame, version=version, header=True)

    def read_frame(self) -> bytes:
        head = self._read_exactly(4, first=True)
        return self._read_exactly(FRAME_SIZE.unpack(head)[0])

    def read_frame_size(self) -> int:
        """Read a whole response without keeping it (large fetches); its size."""
        size: int = FRAME_SIZE.unpack(self._read_exactly(4, first=True))[0]
        left = size
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while left:
            n = self.sock.recv_into(view[: min(left, len(buf))])
            if not n:
                raise ConnectionError("connection closed by the broker mid-response")
            left -= n
        return size

    def _read_exactly(self, n: int, first: bool = False) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed by the broker")
            if first and not buf:
                self.first_byte_at = time.perf_counter()
            buf += chunk
        return bytes(buf)

    def closed_by_peer(self, wait: float) -> bool:
        """True if the broker closes this connection within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def produce_request(topic: str, batches: Iterable[tuple[int, bytes]], acks: int = -1) -> Any:
    """Produce (v3+ fields) of one batch per (partition, batch) of ``topic``."""
    from kafka.protocol.producer import ProduceRequest  # noqa: PLC0415 - slow import, used late

    TD = ProduceRequest.TopicProduceData
    PD = TD.PartitionProduceData
    return ProduceRequest(
        transactional_id=None,
        acks=acks,
        timeout_ms=30_000,
        topic_data=[TD(name=topic, partition_data=[PD(index=p, records=b) for p, b in batches])],
    )


def fetch_request(
    topics: Iterable[tuple[str, Iterable[int]]],
    *,
    max_bytes: int = 50 * 2**20,
    max_wait_ms: int = 0,
    min_bytes: int = 0,
    offset: int = 0,
) -> Any:
    """Fetch (v12 fields) of the given partitions from ``offset``; each partition may take
    ``max_bytes`` too."""
    from kafka.protocol.consumer import FetchRequest as F  # noqa: PLC0415

    return F(
        replica_id=-1,
        max_wait_ms=max_wait_ms,
        min_bytes=min_bytes,
        max_bytes=max_bytes,
        isolation_level=0,
        session_id=0,
        session_epoch=-1,
        forgotten_topics_data=[],
        rack_id="",
        topics=[
            F.FetchTopic(
                topic=topic,
                partitions=[
                    F.FetchTopic.FetchPartition(
                        partition=p,
                        current_leader_epoch=-1,
                        fetch_offset=offset,
                        log_start_offset=-1,
                        partition_max_bytes=max_bytes,
                    )
                    for p in partitions
                ],
            )
            for topic, partitions in topics
        ],
    )
