"""Spliced Fetch responses decode, with every supported version, to exactly what was stored."""

from __future__ import annotations

import asyncio

import pytest
from kafka.protocol.consumer import FetchResponse

from streambus.app import APIS
from streambus.protocol.apis import encode_frame
from streambus.protocol.fetch import _Read, _response
from streambus.records import build_batch

FETCH = APIS[1]


def reads() -> list[_Read]:
    big = build_batch(
        [(b"k", b"v" * 3000, [("h", b"x")], 1)] * 50
    )  # a length of several varint bytes
    small = build_batch([(None, b"tiny", [], 2)])
    return [
        _Read("a", 0, 0, records=big, high_watermark=50, log_start_offset=0),
        _Read("b", 0, 0, error=3),  # an error partition carries no records
        _Read("a", 1, 0, records=memoryview(small), high_watermark=1, log_start_offset=0),
        _Read("b", 1, 7, records=b"", high_watermark=7, log_start_offset=0),
    ]


@pytest.mark.parametrize("version", range(FETCH.min_version, FETCH.max_version + 1))
def test_spliced_frame_decodes_to_the_stored_records(version: int) -> None:
    rs = reads()
    chunks = encode_frame(FETCH, asyncio.run(_response(None, rs)), version, correlation_id=42)
    # structure, length, records for each of the two record sets, then the rest of the structure
    assert len(chunks) == 7, "both record sets were written beside the structure"
    frame = b"".join(bytes(c) for c in chunks)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4, "the frame size was corrected"
    decoded = FetchResponse.decode(frame[4:], version=version, header=True)
    assert decoded.header.correlation_id == 42
    got = {
        (t.topic, p.partition_index): (p.error_code, bytes(p.records or b""), p.high_watermark)
        for t in decoded.responses
        for p in t.partitions
    }
    assert got == {
        ("a", 0): (0, bytes(rs[0].records), 50),
        ("b", 0): (3, b"", -1),
        ("a", 1): (0, bytes(rs[2].records), 1),
        ("b", 1): (0, b"", 7),
    }


def test_a_response_without_records_is_one_piece() -> None:
    rs = [_Read("a", 0, 5, records=b"", high_watermark=5, log_start_offset=0)]
    (frame,) = encode_frame(FETCH, asyncio.run(_response(None, rs)), 12, correlation_id=1)
    decoded = FetchResponse.decode(bytes(frame)[4:], version=12, header=True)
    assert decoded.responses[0].partitions[0].high_watermark == 5
