"""Kafka record batches, format v2 (magic 2), as they travel and as they are stored.

The broker stores the bytes a producer sent, unchanged except for the base
offset (and, for LogAppendTime topics, the timestamps), so this module only
validates and inspects batches; it never re-encodes one on the produce path.
``build_batch`` exists for the compactor and for tests.

Record layout inside a batch (after decompression of the records section)::

    Record =>
      Length => varint           # bytes of the record after this field
      Attributes => int8         # unused, 0
      TimestampDelta => varlong  # timestamp - batch baseTimestamp
      OffsetDelta => varint      # offset - batch baseOffset
      KeyLength => varint        # -1 for a null key
      Key => bytes
      ValueLength => varint      # -1 for a null value (a tombstone)
      Value => bytes
      HeadersCount => varint
      Header => HeaderKeyLength varint, HeaderKey utf-8,
                HeaderValueLength varint (-1: null), HeaderValue

All varints are zigzag encoded, as in protobuf.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import crc32c

from streambus.errors import (
    CorruptRecordError,
    InvalidRecordError,
    MessageTooLargeError,
)
from streambus.records.compression import MAX_INFLATED_BYTES, deflate, inflate

Buffer = bytes | bytearray | memoryview

# Batch header, big-endian, 61 bytes:
HEADER = struct.Struct(
    ">"
    "q"  # baseOffset: offset of the first record; assigned by the broker
    "i"  # batchLength: bytes that follow this field (whole batch minus 12)
    "i"  # partitionLeaderEpoch: not covered by the CRC
    "b"  # magic: format version, always 2 here
    "I"  # crc: CRC-32C (Castagnoli) of attributes .. end of batch
    "h"  # attributes: bits 0-2 compression, 3 timestamp type, 4 transactional, 5 control
    "i"  # lastOffsetDelta: last record's offset - baseOffset
    "q"  # baseTimestamp: timestamp of the first record
    "q"  # maxTimestamp: largest record timestamp (or the log append time)
    "q"  # producerId: -1 unless the producer is idempotent or transactional
    "h"  # producerEpoch
    "i"  # baseSequence: sequence number of the first record, -1 if none
    "i"  # recordsCount: number of records that follow
)
# The two fields every reader needs first: where the batch starts and how long it is.
LOG_OVERHEAD = struct.Struct(">qi")  # baseOffset, batchLength
_BASE_OFFSET = struct.Struct(">q")
_CRC = struct.Struct(">I")
_TIMESTAMPS = struct.Struct(">qq")  # baseTimestamp, maxTimestamp
_ATTRIBUTES = struct.Struct(">h")
_LEADER_EPOCH = struct.Struct(">i")  # partitionLeaderEpoch

PARTITION_LEADER_EPOCH_OFFSET = 12  # partitionLeaderEpoch position; the CRC skips it
CRC_OFFSET = 17  # crc field position within the header
ATTRIBUTES_OFFSET = 21  # first byte the CRC covers
TIMESTAMPS_OFFSET = 27  # baseTimestamp position
MAGIC_OFFSET = 16
# batchLength of a batch with no records: the header minus baseOffset and batchLength.
MIN_BATCH_LENGTH = HEADER.size - LOG_OVERHEAD.size  # 49

COMPRESSION_MASK = 0x07
TIMESTAMP_TYPE_MASK = 0x08  # set: LogAppendTime
TRANSACTIONAL_MASK = 0x10
CONTROL_MASK = 0x20

NO_TIMESTAMP = -1

# A trace-header scan inflates a compressed batch at most this far. The produce path scans
# before the append has checked the batch against max.message.bytes, so without this bound a
# small bomb would be inflated to MAX_INFLATED_BYTES on the event loop just to look for
# traceparents. A batch inflating further yields no trace links; its append decides its fate.
TRACE_SCAN_INFLATED_BYTES = 8 * 1024 * 1024


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Bytes of the whole batch, baseOffset and batchLength included."""
        return self.batch_length + LOG_OVERHEAD.size

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> int:
        return self.attributes & COMPRESSION_MASK

    @property
    def timestamp_type(self) -> int:
        """0 for CreateTime, 1 for LogAppendTime."""
        return (self.attributes & TIMESTAMP_TYPE_MASK) >> 3

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & TRANSACTIONAL_MASK)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_MASK)


class Record(NamedTuple):
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def read_header(data: Buffer, pos: int) -> BatchHeader:
    """The header at ``pos``, unchecked: callers that trust the bytes (the log's own
    files after recovery) use this to walk batches without touching records."""
    return BatchHeader._make(HEADER.unpack_from(data, pos))


def compression_of(data: Buffer, pos: int = 0) -> int:
    """The compression codec of the batch at ``pos`` (0: none), read from its attributes."""
    (attributes,) = _ATTRIBUTES.unpack_from(data, pos + ATTRIBUTES_OFFSET)
    return int(attributes) & COMPRESSION_MASK


def check_batch(view: memoryview, pos: int) -> BatchHeader:
    """Validate the batch starting at ``pos`` of ``view`` and return its header."""
    remaining = len(view) - pos
    if remaining < LOG_OVERHEAD.size:
        raise CorruptRecordError(f"{remaining} trailing bytes at position {pos} are not a batch")
    _, batch_length = LOG_OVERHEAD.unpack_from(view, pos)
    if batch_length < MIN_BATCH_LENGTH:
        raise CorruptRecordError(
            f"batch length {batch_length} at position {pos} is below the minimum {MIN_BATCH_LENGTH}"
        )
    end = pos + LOG_OVERHEAD.size + batch_length
    if end > len(view):
        raise CorruptRecordError(
            f"batch at position {pos} needs {end - pos} bytes, only {remaining} present"
        )
    magic = view[pos + MAGIC_OFFSET]
    if magic != 2:
        raise InvalidRecordError(f"magic byte {magic} not supported")
    header = BatchHeader._make(HEADER.unpack_from(view, pos))
    actual = crc32c.crc32c(view[pos + ATTRIBUTES_OFFSET : end])
    if actual != header.crc:
        raise CorruptRecordError(
            f"batch at position {pos} failed its CRC check: "
            f"expected {header.crc:#010x}, actual {actual:#010x}"
        )
    return header


def parse_batches(data: Buffer) -> list[tuple[int, BatchHeader]]:
    """(position, header) of every batch in ``data``, each checked for length, magic and CRC."""
    view = memoryview(data)
    out: list[tuple[int, BatchHeader]] = []
    pos = 0
    while pos < len(view):
        header = check_batch(view, pos)
        out.append((pos, header))
        pos += header.size
    return out


def _records_section(
    data: Buffer,
    pos: int,
    header: BatchHeader,
    limit: int = MAX_INFLATED_BYTES,
    limit_name: str = "the broker's decompression limit",
) -> tuple[Buffer, int, int]:
    """(buffer, start, end) of the batch's records, decompressed if need be (at most ``limit``
    bytes of output: more raises MessageTooLargeError naming ``limit_name``)."""
    start, end = pos + HEADER.size, pos + header.size
    if header.compression == 0:
        return data, start, end
    raw = inflate(memoryview(data)[start:end], header.compression, limit, limit_name)
    return raw, 0, len(raw)


def _varint(buf: Buffer, i: int) -> tuple[int, int]:
    """Zigzag varint at ``i``: (value, next position). IndexError if it runs off the end."""
    b = buf[i]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), i + 1
    result = b & 0x7F
    shift = 7
    while True:
        i += 1
        b = buf[i]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), i + 1
        shift += 7
        if shift > 63:
            raise InvalidRecordError("varint longer than 10 bytes")


def _skip_varint(buf: Buffer, i: int) -> int:
    while buf[i] & 0x80:
        i += 1
    return i + 1


def payload_bytes(data: Buffer, pos: int, header: BatchHeader) -> int:
    """Key + value + header key + header value bytes of the batch's records (null counts 0).

    Also the broker's structural check of the records: every length must stay
    inside its record and the record count must match ``recordsCount``.

    This runs for every produced batch, so the loop is written for speed:
    one- and two-byte varints (lengths below 8192) are decoded inline, and only
    longer ones pay for a call.
    """
    buf, i, end = _records_section(data, pos, header)
    return _payload(buf, i, end, header.records_count)


def validate_records(
    data: Buffer, pos: int, header: BatchHeader, *, limit: int, keys_required: bool
) -> int:
    """The produce path's check of a batch's records, decompressing them once, to at most
    ``limit`` bytes (the topic's max.message.bytes): ``payload_bytes``, and for compacted
    topics a key on every record."""
    buf, i, end = _records_section(data, pos, header, limit, "max.message.bytes")
    total = _payload(buf, i, end, header.records_count)
    if keys_required:
        for record in _records(buf, i, end, header):
            if record.key is None:
                raise InvalidRecordError("compacted topic cannot accept a record without key")
    return total


def checked_records(
    data: Buffer, pos: int, header: BatchHeader, *, limit: int, keys_required: bool
) -> tuple[int, Buffer, int, int]:
    """``validate_records``, and the records section it checked (buffer, start, end: the
    batch's own bytes, or the decompressed ones), for checks that read every record (schema
    validation) without decompressing twice. Its framing is checked: lengths stay inside
    their records and the count matches ``recordsCount``."""
    buf, i, end = _records_section(data, pos, header, limit, "max.message.bytes")
    total = _payload(buf, i, end, header.records_count)
    if keys_required:
        for record in _records(buf, i, end, header):
            if record.key is None:
                raise InvalidRecordError("compacted topic cannot accept a record without key")
    return total, buf, i, end


def _payload(buf: Buffer, i: int, end: int, records_count: int) -> int:
    total = 0
    varint = _varint
    try:
        for _ in range(records_count):
            b = buf[i]
            if b < 0x80:
                length, i = (b >> 1) ^ -(b & 1), i + 1
            elif buf[i + 1] < 0x80:
                raw = (b & 0x7F) | (buf[i + 1] << 7)
                length, i = (raw >> 1) ^ -(raw & 1), i + 2
            else:
                length, i = varint(buf, i)
            record_end = i + length
            if length <= 0 or record_end > end:
                raise InvalidRecordError(f"record length {length} runs past the batch")
            i += 1  # attributes
            while buf[i] & 0x80:  # timestamp delta
                i += 1
            i += 1
            while buf[i] & 0x80:  # offset delta
                i += 1
            i += 1
            b = buf[i]  # key length
            if b < 0x80:
                size, i = (b >> 1) ^ -(b & 1), i + 1
            elif buf[i + 1] < 0x80:
                raw = (b & 0x7F) | (buf[i + 1] << 7)
                size, i = (raw >> 1) ^ -(raw & 1), i + 2
            else:
                size, i = varint(buf, i)
            if size > 0:
                total += size
                i += size
            elif size < -1:
                raise InvalidRecordError(f"record key length {size}")
            b = buf[i]  # value length
            if b < 0x80:
                size, i = (b >> 1) ^ -(b & 1), i + 1
            elif buf[i + 1] < 0x80:
                raw = (b & 0x7F) | (buf[i + 1] << 7)
                size, i = (raw >> 1) ^ -(raw & 1), i + 2
            else:
                size, i = varint(buf, i)
            if size > 0:
                total += size
                i += size
            elif size < -1:
                raise InvalidRecordError(f"record value length {size}")
            b = buf[i]  # header count
            if b:
                count, i = varint(buf, i)
                for _ in range(count):
                    size, i = varint(buf, i)
                    if size < 0:
                        raise InvalidRecordError("record header key is null")
                    total += size
                    i += size
                    size, i = varint(buf, i)
                    if size > 0:
                        total += size
                        i += size
            else:
                i += 1
            if i != record_end:
                raise InvalidRecordError(f"record fields do not fill its length {length}")
    except IndexError:
        raise InvalidRecordError("record runs past the end of the batch") from None
    if i != end:
        raise InvalidRecordError(f"batch holds more data than its {records_count} records")
    return total


def walk_batches(data: Buffer) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each whole batch in ``data``, unchecked: for batches already stored."""
    pos, size = 0, len(data)
    while pos + HEADER.size <= size:
        header = read_header(data, pos)
        if header.batch_length < MIN_BATCH_LENGTH or pos + header.size > size:
            return
        yield pos, header
        pos += header.size


def header_values(data: Buffer, pos: int, header: BatchHeader, key: str, limit: int) -> list[bytes]:
    """Distinct values of header ``key`` among the batch's records, at most ``limit`` of them.

    Trace context rides in a header of every record, and decoding each record
    to find it would cost more than the span it feeds. Instead the encoded key
    (its length varint, then its bytes) is searched for at C speed; a value
    that merely contains those bytes can be mistaken for a header, so callers
    validate what they get (a traceparent that does not parse is dropped).
    """
    try:
        buf, start, end = _records_section(
            data, pos, header, TRACE_SCAN_INFLATED_BYTES, "trace scan limit"
        )
    except MessageTooLargeError:
        return []
    if isinstance(buf, memoryview):
        # memoryview has no find: copy this batch's records only. Copying all of
        # ``data`` here made a response's scan quadratic in its number of batches.
        buf, start, end = bytes(buf[start:end]), 0, end - start
    encoded = key.encode()
    needle = bytearray()
    _put_bytes(needle, encoded)
    found: dict[bytes, None] = {}
    i = buf.find(needle, start, end)
    while i >= 0:
        j = i + len(needle)
        try:
            length, j = _varint(buf, j)
        except (IndexError, InvalidRecordError):
            break
        if length >= 0 and j + length <= end:
            found.setdefault(bytes(buf[j : j + length]))
            if len(found) >= limit:
                break
            i = buf.find(needle, j + length, end)
        else:
            i = buf.find(needle, i + 1, end)
    return list(found)


def _bytes_at(buf: Buffer, i: int) -> tuple[bytes | None, int]:
    size, i = _varint(buf, i)
    if size < 0:
        return None, i
    return bytes(buf[i : i + size]), i + size


def iter_records(data: Buffer, pos: int, header: BatchHeader) -> Iterator[Record]:
    """The records of one batch, decompressed; assumes ``payload_bytes`` accepted it."""
    buf, i, end = _records_section(data, pos, header)
    return _records(buf, i, end, header)


def _records(buf: Buffer, i: int, end: int, header: BatchHeader) -> Iterator[Record]:
    log_append = header.timestamp_type == 1
    try:
        for _ in range(header.records_count):
            length, i = _varint(buf, i)
            record_end = i + length
            ts_delta, i = _varint(buf, i + 1)
            offset_delta, i = _varint(buf, i)
            key, i = _bytes_at(buf, i)
            value, i = _bytes_at(buf, i)
            count, i = _varint(buf, i)
            headers: list[tuple[str, bytes | None]] = []
            for _ in range(count):
                hkey, i = _bytes_at(buf, i)
                hvalue, i = _bytes_at(buf, i)
                headers.append(((hkey or b"").decode("utf-8", "replace"), hvalue))
            if i != record_end or i > end:
                raise InvalidRecordError("record fields do not fill its length")
            timestamp = header.max_timestamp if log_append else header.base_timestamp + ts_delta
            yield Record(header.base_offset + offset_delta, timestamp, key, value, tuple(headers))
    except IndexError:
        raise InvalidRecordError("record runs past the end of the batch") from None


def set_base_offset(buf: bytearray, pos: int, base_offset: int) -> None:
    """Assign the batch's base offset; the CRC does not cover it, so it stays valid."""
    _BASE_OFFSET.pack_into(buf, pos, base_offset)


def set_partition_leader_epoch(buf: bytearray, pos: int, epoch: int) -> None:
    """Stamp the epoch of the leader that appended the batch; outside the CRC, like the
    base offset, so the batch stays valid."""
    _LEADER_EPOCH.pack_into(buf, pos + PARTITION_LEADER_EPOCH_OFFSET, epoch)


def partition_leader_epoch(data: Buffer, pos: int = 0) -> int:
    """The partitionLeaderEpoch of the batch at ``pos`` (-1: none stamped)."""
    (epoch,) = _LEADER_EPOCH.unpack_from(data, pos + PARTITION_LEADER_EPOCH_OFFSET)
    return int(epoch)


def _rewrite_crc(buf: bytearray, pos: int) -> None:
    _, batch_length = LOG_OVERHEAD.unpack_from(buf, pos)
    end = pos + LOG_OVERHEAD.size + batch_length
    _CRC.pack_into(
        buf, pos + CRC_OFFSET, crc32c.crc32c(memoryview(buf)[pos + ATTRIBUTES_OFFSET : end])
    )


def set_log_append_time(buf: bytearray, pos: int, timestamp_ms: int) -> None:
    """Stamp the batch with the broker's clock (LogAppendTime topics) and fix the CRC.

    Consumers read every record's timestamp from maxTimestamp once bit 3 is set;
    baseTimestamp is overwritten too so the header tells one consistent story.
    """
    (attributes,) = _ATTRIBUTES.unpack_from(buf, pos + ATTRIBUTES_OFFSET)
    _ATTRIBUTES.pack_into(buf, pos + ATTRIBUTES_OFFSET, attributes | TIMESTAMP_TYPE_MASK)
    _TIMESTAMPS.pack_into(buf, pos + TIMESTAMPS_OFFSET, timestamp_ms, timestamp_ms)
    _rewrite_crc(buf, pos)


def _put_varint(out: bytearray, value: int) -> None:
    value = (value << 1) ^ (value >> 63)  # zigzag
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_bytes(out: bytearray, data: bytes | None) -> None:
    if data is None:
        _put_varint(out, -1)
    else:
        _put_varint(out, len(data))
        out += data


def build_batch(
    records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes | None]], int]],
    *,
    base_offset: int = 0,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    offset_deltas: Sequence[int] | None = None,
    attributes: int = 0,
) -> bytes:
    """An uncompressed, CreateTime v2 batch of (key, value, headers, timestamp_ms) records.

    ``offset_deltas`` (ascending, one per record) keeps the original offsets of
    records that survived compaction; by default they are 0, 1, 2, ...
    ``attributes``: only the transactional and control bits may be set.
    """
    if attributes & ~(TRANSACTIONAL_MASK | CONTROL_MASK):
        raise ValueError(f"build_batch sets no attributes but bits 4-5, got {attributes:#x}")
    if not records:
        raise ValueError("a batch needs at least one record")
    deltas = list(range(len(records))) if offset_deltas is None else list(offset_deltas)
    if len(deltas) != len(records):
        raise ValueError("offset_deltas needs one entry per record")
    base_ts = records[0][3]
    body = bytearray()
    record = bytearray()
    for (key, value, headers, timestamp), delta in zip(records, deltas, strict=True):
        record.clear()
        record.append(0)  # attributes
        _put_varint(record, timestamp - base_ts)
        _put_varint(record, delta)
        _put_bytes(record, key)
        _put_bytes(record, value)
        _put_varint(record, len(headers))
        for hkey, hvalue in headers:
            _put_bytes(record, hkey.encode())
            _put_bytes(record, hvalue)
        _put_varint(body, len(record))
        body += record
    buf = bytearray(HEADER.size)
    HEADER.pack_into(
        buf,
        0,
        base_offset,
        MIN_BATCH_LENGTH + len(body),
        -1,  # partitionLeaderEpoch
        2,
        0,  # crc, computed below
        attributes,
        deltas[-1],
        base_ts,
        max(r[3] for r in records),
        producer_id,
        producer_epoch,
        base_sequence,
        len(records),
    )
    buf += body
    _rewrite_crc(buf, 0)
    return bytes(buf)


# -- transaction markers (control batches) -------------------------------------------
# A marker is a batch with the transactional and control bits set, the producer's id
# and epoch, baseSequence -1, and exactly one record whose key and value are:
CONTROL_KEY = struct.Struct(
    ">"
    "h"  # version: 0
    "h"  # type: 0 abort, 1 commit (Kafka's ControlRecordType)
)
CONTROL_VALUE = struct.Struct(
    ">"
    "h"  # version: 0
    "i"  # coordinatorEpoch: epoch of the transaction coordinator that wrote the marker
)
CONTROL_ABORT = 0
CONTROL_COMMIT = 1


class ControlRecord(NamedTuple):
    """What a transaction marker says."""

    commit: bool
    coordinator_epoch: int


def build_control_batch(
    producer_id: int,
    producer_epoch: int,
    *,
    commit: bool,
    coordinator_epoch: int,
    timestamp_ms: int,
    base_offset: int = 0,
) -> bytes:
    """A commit or abort marker for ``producer_id``'s transaction, in Kafka's layout."""
    key = CONTROL_KEY.pack(0, CONTROL_COMMIT if commit else CONTROL_ABORT)
    value = CONTROL_VALUE.pack(0, coordinator_epoch)
    return build_batch(
        [(key, value, (), timestamp_ms)],
        base_offset=base_offset,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        attributes=TRANSACTIONAL_MASK | CONTROL_MASK,
    )


def parse_control_record(data: Buffer, pos: int, header: BatchHeader) -> ControlRecord | None:
    """The marker held by the control batch at ``pos``; None if its record is not a
    transaction marker (another control type, or a key Kafka does not define)."""
    for record in iter_records(data, pos, header):
        key = record.key
        if key is None or len(key) < CONTROL_KEY.size:
            return None
        version, kind = CONTROL_KEY.unpack_from(key, 0)
        if version != 0 or kind not in (CONTROL_ABORT, CONTROL_COMMIT):
            return None
        coordinator_epoch = -1
        value = record.value
        if value is not None and len(value) >= CONTROL_VALUE.size:
            _, coordinator_epoch = CONTROL_VALUE.unpack_from(value, 0)
        return ControlRecord(kind == CONTROL_COMMIT, coordinator_epoch)
    return None


def with_attributes(batch: bytes, attributes: int) -> bytes:
    """``batch`` (one, built by ``build_batch``) with ``attributes`` bits set, CRC redone."""
    buf = bytearray(batch)
    (current,) = _ATTRIBUTES.unpack_from(buf, ATTRIBUTES_OFFSET)
    _ATTRIBUTES.pack_into(buf, ATTRIBUTES_OFFSET, current | attributes)
    _rewrite_crc(buf, 0)
    return bytes(buf)


def recompressed(data: Buffer, codec: int, level: int, limit: int) -> bytes | Buffer:
    """``data`` (one checked batch) with its records section in ``codec`` (0: none), as a
    topic's ``compression.type`` asks; unchanged when it already is, or when it is a
    control batch. Inflating is bounded by ``limit`` (max.message.bytes); header fields
    the records do not hold (offsets, timestamps, producer state) stay as they were."""
    (pos, header), *rest = parse_batches(data)
    if rest:
        raise InvalidRecordError(f"expected exactly one record batch, got {len(rest) + 1}")
    if header.compression == codec or header.attributes & CONTROL_MASK:
        return data
    buf, start, end = _records_section(data, pos, header, limit, "max.message.bytes")
    records = memoryview(buf)[start:end]
    body = bytes(records) if codec == 0 else deflate(records, codec, level)
    out = bytearray(memoryview(data)[pos : pos + HEADER.size]) + body
    LOG_OVERHEAD.pack_into(out, 0, header.base_offset, len(out) - LOG_OVERHEAD.size)
    attributes = (header.attributes & ~COMPRESSION_MASK) | codec
    _ATTRIBUTES.pack_into(out, ATTRIBUTES_OFFSET, attributes)
    _rewrite_crc(out, 0)
    return bytes(out)
