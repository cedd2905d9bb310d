"""Bounded decompression of a record batch's records section.

Kafka compresses the records of a batch as one unit (attributes bits 0-2 name
the codec). A few hundred bytes of gzip can inflate to gigabytes, so gzip is
inflated in steps with the running size checked between them, never after.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from kafka import codec

from streambus.errors import (
    InvalidRecordError,
    MessageTooLargeError,
    UnsupportedCompressionTypeError,
)

_Buffer = bytes | bytearray | memoryview

_DECODERS: dict[int, tuple[str, Callable[[], bool], Callable[[bytes], bytes]]] = {
    1: ("gzip", codec.has_gzip, codec.gzip_decode),
    2: ("snappy", codec.has_snappy, codec.snappy_decode),
    3: ("lz4", codec.has_lz4, codec.lz4_decode),  # None without an lz4 library
    4: ("zstd", codec.has_zstd, codec.zstd_decode),
}
GZIP = 1

# Decompressed records of one batch above this are refused on every path that
# reads stored batches (fetch counting, compaction, offset loading); the produce
# path refuses far earlier, at the topic's max.message.bytes. A few hundred
# bytes of gzip can inflate to gigabytes, so the size is checked while
# inflating, never after.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
# Output produced per decompression step between checks of the running total.
_INFLATE_STEP = 256 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, as Kafka's GZIPOutputStream writes


def inflate(compressed: _Buffer, compression: int, limit: int, limit_name: str) -> bytes:
    """The records section ``compressed`` with codec ``compression``, inflated to at most
    ``limit`` bytes (more raises MessageTooLargeError naming ``limit_name``)."""
    entry = _DECODERS.get(compression)
    if entry is None:
        raise UnsupportedCompressionTypeError(f"unknown compression type {compression}")
    name, available, decode = entry
    if not available():
        raise UnsupportedCompressionTypeError(f"{name} compression is not available on this broker")
    try:
        # The other codecs' libraries inflate whole and the size is checked after;
        # none of them ships with StreamBus.
        raw = _gunzip(compressed, limit) if compression == GZIP else decode(bytes(compressed))
    except _InflatedTooMuchError:
        raw = None
    except Exception as exc:  # the codecs raise whatever their libraries raise
        raise InvalidRecordError(f"cannot decompress {name} batch: {exc}") from exc
    if raw is None or len(raw) > limit:
        raise MessageTooLargeError(
            f"{name} batch inflates to more than {limit} bytes ({limit_name})"
        )
    return raw


class _InflatedTooMuchError(Exception):
    pass


def _gunzip(compressed: _Buffer, limit: int) -> bytes:
    """Inflate gzip members one after another in steps of at most ``_INFLATE_STEP`` bytes,
    stopping as soon as the output passes ``limit``."""
    out = bytearray()
    pending = bytes(compressed)
    while pending:
        inflater = zlib.decompressobj(_GZIP_WBITS)
        chunk = pending
        while not inflater.eof:
            piece = inflater.decompress(chunk, _INFLATE_STEP)
            out += piece
            if len(out) > limit:
                raise _InflatedTooMuchError
            chunk = inflater.unconsumed_tail
            if not piece and not chunk:
                raise InvalidRecordError("gzip data ends before its end-of-stream marker")
        # Like Python's gzip module: members may follow, and zero padding after the last.
        pending = inflater.unused_data.lstrip(b"\0")
    return bytes(out)
