"""Record batch v2 parsing, validation and building, checked against kafka-python."""

from __future__ import annotations

import struct

import crc32c
import pytest
from kafka.codec import gzip_encode
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from streambus.errors import CorruptRecordError, InvalidRecordError
from streambus.records import build_batch, iter_records, parse_batches, payload_bytes
from streambus.records.batch import HEADER, set_base_offset, set_log_append_time

RecordSpec = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], int]

RECORDS: list[RecordSpec] = [
    (b"k1", b"value-1", [("h", b"hv")], 1_000),
    (None, b"v2", [], 1_005),
    (b"key3", None, [("a", None), ("bb", b"x")], 1_002),
]
# key + value + header key + header value bytes of RECORDS
RECORDS_PAYLOAD = (2 + 7 + 1 + 2) + (0 + 2) + (4 + 0 + 1 + 0 + 2 + 1)


def kafka_python_batch(records: list[RecordSpec], compression: int = 0) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, (key, value, headers, ts) in enumerate(records):
        builder.append(offset, timestamp=ts, key=key, value=value, headers=headers)
    return bytes(builder.build())


def gzip_by_hand(batch: bytes) -> bytes:
    """Compress the records section of an uncompressed batch and fix length, attributes, CRC."""
    fields = list(HEADER.unpack_from(batch, 0))
    compressed = gzip_encode(batch[HEADER.size :])
    fields[1] = HEADER.size - 12 + len(compressed)  # batchLength
    fields[5] |= 1  # attributes: gzip
    out = bytearray(HEADER.pack(*fields) + compressed)
    struct.pack_into(">I", out, 17, crc32c.crc32c(bytes(out[21:])))
    return bytes(out)


def test_build_then_parse_round_trip() -> None:
    data = build_batch(RECORDS, base_offset=7)
    [(pos, header)] = parse_batches(data)
    assert pos == 0
    assert header.size == len(data) == header.batch_length + 12
    assert header.base_offset == 7
    assert header.last_offset == 9
    assert header.records_count == 3
    assert header.magic == 2
    assert header.compression == 0
    assert header.timestamp_type == 0
    assert not header.is_transactional
    assert not header.is_control
    assert header.base_timestamp == 1_000
    assert header.max_timestamp == 1_005
    records = list(iter_records(data, 0, header))
    assert [(r.offset, r.timestamp, r.key, r.value) for r in records] == [
        (7, 1_000, b"k1", b"value-1"),
        (8, 1_005, None, b"v2"),
        (9, 1_002, b"key3", None),
    ]
    assert records[2].headers == (("a", None), ("bb", b"x"))


def test_build_batch_is_readable_by_kafka_python() -> None:
    data = build_batch(RECORDS, base_offset=100, producer_id=5, producer_epoch=1, base_sequence=9)
    batch = DefaultRecordBatch(bytearray(data))
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (5, 1, 9)
    got = [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]
    assert got == [
        (100, 1_000, b"k1", b"value-1", [("h", b"hv")]),
        (101, 1_005, None, b"v2", []),
        (102, 1_002, b"key3", None, [("a", None), ("bb", b"x")]),
    ]


def test_parse_kafka_python_batches_back_to_back() -> None:
    one = kafka_python_batch(RECORDS)
    two = kafka_python_batch([(b"x", b"y", [], 5)])
    parsed = parse_batches(one + two)
    assert [pos for pos, _ in parsed] == [0, len(one)]
    assert [h.records_count for _, h in parsed] == [3, 1]
    assert payload_bytes(one + two, len(one), parsed[1][1]) == 2


def test_offset_deltas_keep_gaps() -> None:
    data = build_batch(RECORDS[:2], base_offset=10, offset_deltas=[0, 5])
    [(_, header)] = parse_batches(data)
    assert header.last_offset == 15
    assert [r.offset for r in iter_records(data, 0, header)] == [10, 15]


def test_crc_corruption_detected() -> None:
    data = bytearray(build_batch(RECORDS))
    data[-1] ^= 0xFF
    with pytest.raises(CorruptRecordError, match=r"expected 0x[0-9a-f]{8}, actual 0x[0-9a-f]{8}"):
        parse_batches(data)


def test_wrong_magic_rejected() -> None:
    data = bytearray(build_batch(RECORDS))
    data[16] = 1
    with pytest.raises(InvalidRecordError, match="magic byte 1 not supported"):
        parse_batches(data)


def test_truncated_batch_and_trailing_bytes_rejected() -> None:
    data = build_batch(RECORDS)
    with pytest.raises(CorruptRecordError, match="needs"):
        parse_batches(data[:-3])
    with pytest.raises(CorruptRecordError, match="trailing"):
        parse_batches(data + b"\x00\x00\x00")
    with pytest.raises(CorruptRecordError, match="below the minimum"):
        parse_batches(struct.pack(">qi", 0, 10) + bytes(60))


def test_payload_bytes_counts_keys_values_and_headers() -> None:
    data = build_batch(RECORDS)
    [(_, header)] = parse_batches(data)
    assert payload_bytes(data, 0, header) == RECORDS_PAYLOAD
    # the same records from a real client library
    theirs = kafka_python_batch(RECORDS)
    assert payload_bytes(theirs, 0, parse_batches(theirs)[0][1]) == RECORDS_PAYLOAD


def test_payload_bytes_of_empty_and_null_records() -> None:
    data = build_batch([(None, None, [], 0), (b"", b"", [("", b"")], 0)])
    assert payload_bytes(data, 0, parse_batches(data)[0][1]) == 0


def test_payload_bytes_of_gzip_batch() -> None:
    plain = build_batch(RECORDS)
    data = gzip_by_hand(plain)
    [(_, header)] = parse_batches(data)
    assert header.compression == 1
    assert len(data) != len(plain)
    assert payload_bytes(data, 0, header) == RECORDS_PAYLOAD
    assert [r.key for r in iter_records(data, 0, header)] == [b"k1", None, b"key3"]
    # and kafka-python's own gzip batches
    theirs = kafka_python_batch(RECORDS, compression=1)
    assert payload_bytes(theirs, 0, parse_batches(theirs)[0][1]) == RECORDS_PAYLOAD


def test_malformed_records_rejected() -> None:
    data = bytearray(build_batch(RECORDS))
    fields = list(HEADER.unpack_from(data, 0))
    fields[12] = 4  # recordsCount claims one more record than present
    HEADER.pack_into(data, 0, *fields)
    struct.pack_into(">I", data, 17, crc32c.crc32c(bytes(data[21:])))
    [(_, header)] = parse_batches(data)
    with pytest.raises(InvalidRecordError):
        payload_bytes(data, 0, header)
    fields[12] = 2  # one record fewer: data left over
    HEADER.pack_into(data, 0, *fields)
    struct.pack_into(">I", data, 17, crc32c.crc32c(bytes(data[21:])))
    [(_, header)] = parse_batches(data)
    with pytest.raises(InvalidRecordError, match="more data"):
        payload_bytes(data, 0, header)


def test_record_length_past_end_rejected() -> None:
    data = bytearray(build_batch([(b"k", b"v", [], 0)]))
    data[HEADER.size] = 0x7E  # first record's length varint: 63 bytes, far past the end
    struct.pack_into(">I", data, 17, crc32c.crc32c(bytes(data[21:])))
    [(_, header)] = parse_batches(data)
    with pytest.raises(InvalidRecordError):
        payload_bytes(data, 0, header)


def test_set_base_offset_keeps_crc_valid() -> None:
    data = bytearray(build_batch(RECORDS))
    set_base_offset(data, 0, 123_456_789)
    [(_, header)] = parse_batches(data)
    assert header.base_offset == 123_456_789
    assert [r.offset for r in iter_records(data, 0, header)] == [
        123_456_789,
        123_456_790,
        123_456_791,
    ]


def test_set_log_append_time() -> None:
    data = bytearray(build_batch(RECORDS))
    set_log_append_time(data, 0, 99_999)
    [(_, header)] = parse_batches(data)  # CRC recomputed
    assert header.timestamp_type == 1
    assert header.max_timestamp == header.base_timestamp == 99_999
    assert {r.timestamp for r in iter_records(data, 0, header)} == {99_999}
    batch = DefaultRecordBatch(bytearray(data))
    assert batch.validate_crc()
    assert batch.timestamp_type == 1
    assert [r.timestamp for r in batch] == [99_999] * 3


def test_header_values_finds_distinct_values_up_to_the_limit() -> None:
    from streambus.records.batch import header_values

    def tp(i: int) -> bytes:
        return f"00-{i:032x}-{i:016x}-01".encode()

    records = [
        (b"k", b"traceparent value text", [("other", b"x"), ("traceparent", tp(i % 3))], 1)
        for i in range(9)
    ]
    data = build_batch(records)
    ((pos, header),) = parse_batches(data)
    assert header_values(data, pos, header, "traceparent", 10) == [tp(0), tp(1), tp(2)]
    assert header_values(data, pos, header, "traceparent", 2) == [tp(0), tp(1)]
    assert header_values(data, pos, header, "absent", 10) == []
    same = build_batch([(b"k", b"v", [("traceparent", tp(7))], 1)] * 5)
    ((pos, header),) = parse_batches(same)
    assert header_values(same, pos, header, "traceparent", 10) == [tp(7)]


@pytest.mark.parametrize("size", [0, 1, 63, 64, 100, 8191, 8192, 20_000])
def test_payload_bytes_at_varint_width_boundaries(size: int) -> None:
    """Lengths whose zigzag varints take one, two and three bytes (the inlined fast paths)."""
    blob = b"v" * size
    records = [
        (blob, blob, [("h" * (size % 70), blob)], 1),
        (None, blob, [], 2),
        (blob, None, [], 3),
    ]
    data = build_batch(records)
    ((pos, header),) = parse_batches(data)
    assert payload_bytes(data, pos, header) == 3 * size + size % 70 + size + size
