"""Bounded decompression of a record batch's records section.

Kafka compresses the records of a batch as one unit (attributes bits 0-2 name
the codec: 1 gzip, 2 snappy, 3 lz4, 4 zstd). A few KB of any of them can
inflate to gigabytes, so no codec is ever given more room than the limit:

- gzip is inflated in steps with the running size checked between them;
- snappy announces each block's size in a preamble the decoder enforces, so the
  total is checked before anything is decompressed, into a buffer of exactly
  that size;
- lz4 and zstd (frame formats) are decompressed by cramjam into a fixed buffer
  it cannot write past: a frame that announces its content size is refused at
  once if that passes the limit, and the announcement only sizes the first
  buffer (never trusted alone); a larger buffer is tried, up to limit + 1
  bytes, only while the output keeps filling it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import cramjam

from streambus.errors import (
    InvalidRecordError,
    MessageTooLargeError,
    UnsupportedCompressionTypeError,
)

_Buffer = bytes | bytearray | memoryview

GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4

# Decompressed records of one batch above this are refused on every path that
# reads stored batches (fetch counting, compaction, offset loading); the produce
# path refuses far earlier, at the topic's max.message.bytes.
MAX_INFLATED_BYTES = 256 * 1024 * 1024
# Output produced per gzip step between checks of the running total.
_INFLATE_STEP = 256 * 1024
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, as Kafka's GZIPOutputStream writes
# First output buffer for an lz4/zstd batch that does not announce its size: records
# compress about 2-5 times, and each retry quadruples it (at most limit + 1 bytes).
_FIRST_GUESS_RATIO = 4
_MIN_FIRST_BUFFER = 64 * 1024
_GROWTH = 4


class _InflatedTooMuchError(Exception):
    pass


def inflate(compressed: _Buffer, compression: int, limit: int, limit_name: str) -> bytearray:
    """The records section ``compressed`` with codec ``compression``, inflated to at most
    ``limit`` bytes (more raises MessageTooLargeError naming ``limit_name``; bytes no codec
    can read raise InvalidRecordError)."""
    entry = _DECODERS.get(compression)
    if entry is None:
        raise UnsupportedCompressionTypeError(f"unknown compression type {compression}")
    name, decode = entry
    try:
        return decode(memoryview(compressed), limit)
    except _InflatedTooMuchError:
        raise MessageTooLargeError(
            f"{name} batch inflates to more than {limit} bytes ({limit_name})"
        ) from None
    except InvalidRecordError as exc:
        raise InvalidRecordError(f"cannot decompress {name} batch: {exc}") from None
    except (cramjam.DecompressionError, zlib.error) as exc:
        raise InvalidRecordError(f"cannot decompress {name} batch: {exc}") from None


def _gunzip(compressed: memoryview, limit: int) -> bytearray:
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
    return out


# Snappy as Kafka's Java client writes it (xerial's SnappyOutputStream, which Kafka's
# SnappyFactory wraps): a 16-byte stream header, then chunks, each a raw snappy block:
_XERIAL_MAGIC = b"\x82SNAPPY\x00"  # followed by version (int32, 1) and compatible version (int32)
_XERIAL_HEADER_SIZE = 16
_XERIAL_CHUNK = struct.Struct(">i")  # compressed bytes of the raw snappy block that follows
# librdkafka writes one raw snappy block instead; Java's SnappyInputStream reads either (a
# stream without the magic is taken as raw), and so does librdkafka, so both are accepted.
# xerial streams may also be concatenated: a chunk length position holding the magic again
# starts the next stream's header.


def _unsnappy(compressed: memoryview, limit: int) -> bytearray:
    """Raw or xerial-framed snappy. Each block's preamble states its decompressed size
    and the decoder refuses to write anything else, so the total is known, and checked
    against ``limit``, before a byte is decompressed."""
    if compressed[: len(_XERIAL_MAGIC)] != _XERIAL_MAGIC:
        blocks = [compressed]
    else:
        blocks = []
        pos = _XERIAL_HEADER_SIZE
        while pos < len(compressed):
            if compressed[pos : pos + len(_XERIAL_MAGIC)] == _XERIAL_MAGIC:
                pos += _XERIAL_HEADER_SIZE
                continue
            if pos + _XERIAL_CHUNK.size > len(compressed):
                raise InvalidRecordError("xerial snappy chunk length is cut off")
            (size,) = _XERIAL_CHUNK.unpack_from(compressed, pos)
            pos += _XERIAL_CHUNK.size
            if size <= 0 or pos + size > len(compressed):
                raise InvalidRecordError(f"xerial snappy chunk of {size} bytes runs past the batch")
            blocks.append(compressed[pos : pos + size])
            pos += size
    sizes = []
    for block in blocks:
        if not block:
            raise InvalidRecordError("empty snappy block")
        sizes.append(cramjam.snappy.decompress_raw_len(block))
    if sum(sizes) > limit:
        raise _InflatedTooMuchError
    out = bytearray(sum(sizes))
    view = memoryview(out)
    pos = 0
    for block, size in zip(blocks, sizes, strict=True):
        written = cramjam.snappy.decompress_raw_into(block, view[pos : pos + size])
        if written != size:
            raise InvalidRecordError(f"snappy block holds {written} bytes, announced {size}")
        pos += size
    return out


# LZ4 frame format (Kafka's KafkaLZ4BlockOutputStream for magic 2, librdkafka's LZ4F):
_LZ4_MAGIC = b"\x04\x22\x4d\x18"  # 0x184D2204 little-endian
_LZ4_CONTENT_SIZE_FLAG = 0x08  # FLG bit 3: an 8-byte content size follows FLG and BD
_LZ4_CONTENT_SIZE = struct.Struct("<Q")
# Kafka's magic 0/1 batches carried a broken header checksum; StreamBus serves magic 2
# only (check_batch refuses the others), whose lz4 frames are standard.


def _lz4_content_size(compressed: memoryview) -> int | None:
    """The first frame's announced content size, if it announces one."""
    if compressed[:4] != _LZ4_MAGIC or len(compressed) < 6 + _LZ4_CONTENT_SIZE.size:
        return None
    if not compressed[4] & _LZ4_CONTENT_SIZE_FLAG:
        return None
    return int(_LZ4_CONTENT_SIZE.unpack_from(compressed, 6)[0])


# Zstandard frame header (RFC 8878 3.1.1.1): magic, then a descriptor byte whose bits say
# which optional fields follow and how wide Frame_Content_Size is.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528 little-endian
_ZSTD_DICT_ID_SIZES = (0, 1, 2, 4)  # by Dictionary_ID_flag (bits 0-1)
_ZSTD_CONTENT_SIZE_SIZES = (
    0,
    2,
    4,
    8,
)  # by Frame_Content_Size_flag (bits 6-7); 1 if single segment


def _zstd_content_size(compressed: memoryview) -> int | None:
    """The first frame's announced content size, if it announces one."""
    if compressed[:4] != _ZSTD_MAGIC or len(compressed) < 5:
        return None
    descriptor = compressed[4]
    single_segment = bool(descriptor & 0x20)
    pos = 5 + (0 if single_segment else 1) + _ZSTD_DICT_ID_SIZES[descriptor & 0x03]
    width = _ZSTD_CONTENT_SIZE_SIZES[descriptor >> 6] or (1 if single_segment else 0)
    if width == 0 or pos + width > len(compressed):
        return None
    size = int.from_bytes(compressed[pos : pos + width], "little")
    return size + 256 if width == 2 else size


def _framed(
    decompress_into: Callable[[memoryview, bytearray], int],
    content_size: Callable[[memoryview], int | None],
) -> Callable[[memoryview, int], bytearray]:
    def decode(compressed: memoryview, limit: int) -> bytearray:
        announced = content_size(compressed)
        if announced is not None and announced > limit:
            raise _InflatedTooMuchError
        size = max(announced or 0, _FIRST_GUESS_RATIO * len(compressed), _MIN_FIRST_BUFFER)
        while True:
            size = min(size, limit + 1)
            out = bytearray(size)
            try:
                written = decompress_into(compressed, out)
            except cramjam.DecompressionError as exc:
                # The decoder writes through a fixed-size cursor: a full buffer fails
                # its write ("failed to write whole buffer", Rust's WriteZero).
                if "failed to write whole buffer" not in str(exc):
                    raise
                written = size + 1
            if written <= size and written <= limit:
                del out[written:]
                return out
            if size > limit:
                raise _InflatedTooMuchError
            size *= _GROWTH

    return decode


_DECODERS: dict[int, tuple[str, Callable[[memoryview, int], bytearray]]] = {
    GZIP: ("gzip", _gunzip),
    SNAPPY: ("snappy", _unsnappy),
    LZ4: ("lz4", _framed(cramjam.lz4.decompress_into, _lz4_content_size)),
    ZSTD: ("zstd", _framed(cramjam.zstd.decompress_into, _zstd_content_size)),
}


# -- compression (a topic's compression.type rewrites batches of another codec) ---------------
_XERIAL_BLOCK = 32 * 1024  # uncompressed bytes per xerial block, as the Java client writes them
_XERIAL_VERSION = struct.Struct(">ii")  # version 1, compatible version 1


def deflate(records: _Buffer, compression: int, level: int) -> bytes:
    """``records`` compressed with codec ``compression`` as Kafka's Java client frames it
    (gzip; xerial-framed snappy; an LZ4 frame of independent blocks, which Kafka's reader
    requires; a zstd frame). ``level`` is the topic's ``compression.<codec>.level``
    (gzip -1: zlib's default; snappy has none)."""
    view = memoryview(records)
    if compression == GZIP:
        packer = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
        return packer.compress(view) + packer.flush()
    if compression == SNAPPY:
        out = bytearray(_XERIAL_MAGIC) + _XERIAL_VERSION.pack(1, 1)
        for start in range(0, len(view), _XERIAL_BLOCK):
            block = bytes(cramjam.snappy.compress_raw(view[start : start + _XERIAL_BLOCK]))
            out += _XERIAL_CHUNK.pack(len(block)) + block
        return bytes(out)
    if compression == LZ4:
        frame = cramjam.lz4.Compressor(level, content_checksum=False, block_linked=False)
        frame.compress(bytes(view))  # the streaming compressor takes bytes only
        return bytes(frame.finish())
    if compression == ZSTD:
        return bytes(cramjam.zstd.compress(view, level=level))
    raise UnsupportedCompressionTypeError(f"unknown compression type {compression}")
