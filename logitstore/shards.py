"""The hot read path: a ragged field's shard file, memory-mapped, its index checked, chunks decoded on demand.

zarr-python's own read path costs milliseconds per call; here a row of uncompressed data is a slice of a
memory map, and a row of compressed data is a slice of an inner chunk decoded once into a small LRU cache.
Nothing in a file is trusted before it is checked: index entries must lie inside the file, and a compressed
chunk must declare exactly the decoded size the header promises before it is decompressed.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .errors import FormatError
from .format import RaggedSpec

_MISSING = np.uint64(2**64 - 1)
_ZSTD_MAGIC = 0xFD2FB528
_BLOSC_MAX_OVERHEAD = 16
_BLOSC_VERSION, _BLOSC_ZSTD_VERSION = 2, 1  # c-blosc1's buffer format and its zstd format version
_BLOSC_ZSTD = 4  # flags bits 5-7: the compressor (0 blosclz, 1 lz4, 2 snappy, 3 zlib, 4 zstd)


class ChunkCache:
    """A thread-safe LRU of decoded inner chunks, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


def zstd_content_size(frame: bytes | memoryview) -> int | None:
    """The decoded size a zstd frame declares in its header (None when it declares none)."""
    if len(frame) < 6:
        raise FormatError("truncated zstd frame")
    magic, fhd = struct.unpack_from("<IB", frame, 0)
    if magic != _ZSTD_MAGIC:
        raise FormatError("inner chunk is not a zstd frame")
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    if len(frame) < pos + size:
        raise FormatError("truncated zstd frame header")
    value = int.from_bytes(bytes(frame[pos:pos + size]), "little")
    return value + 256 if size == 2 else value


def zstd_frame_size(frame: bytes | memoryview) -> int:
    """The byte length of the zstd frame at the start of `frame` (header, blocks, checksum), found by walking its
    block headers: a chunk or stream is exactly one frame, and bytes after it (a second frame, a skippable frame)
    would be decoded or skipped silently by the zstd library."""
    if len(frame) < 6:
        raise FormatError("truncated zstd frame")
    fhd = frame[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag] + (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    while True:
        if len(frame) < pos + 3:
            raise FormatError("truncated zstd frame")
        head = int.from_bytes(bytes(frame[pos:pos + 3]), "little")
        block_type, block_size = (head >> 1) & 3, head >> 3
        pos += 3 + (1 if block_type == 1 else block_size)
        if head & 1:  # the last block
            break
    pos += 4 if fhd & 0x04 else 0
    if pos > len(frame):
        raise FormatError("truncated zstd frame")
    return pos


def zstd_bound(size: int) -> int:
    """The largest zstd frame a `size`-byte input can compress to (ZSTD_COMPRESSBOUND), plus a frame header."""
    return size + (size >> 8) + ((128 << 10) - size >> 11 if size < 128 << 10 else 0) + 64


def blosc_bound(size: int) -> int:
    return size + _BLOSC_MAX_OVERHEAD


def decode_chunk(codec: str, data: memoryview, dtype: np.dtype, expected_bytes: int) -> np.ndarray:
    """Decode one chunk into exactly `expected_bytes`, refusing any chunk that declares another size before it is
    decompressed; a chunk that does not decode is a FormatError, whatever the codec library raises."""
    try:
        return _decode_chunk(codec, data, dtype, expected_bytes)
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - codec libraries raise RuntimeError, ValueError, ...
        raise FormatError(f"{codec} chunk does not decode ({exc})") from None


def _decode_chunk(codec: str, data: memoryview, dtype: np.dtype, expected_bytes: int) -> np.ndarray:
    if codec == "raw":
        if len(data) != expected_bytes:
            raise FormatError(f"raw chunk of {len(data)} bytes, expected {expected_bytes}")
        return np.frombuffer(data, dtype=dtype)
    if codec == "zstd":
        from numcodecs import zstd

        declared = zstd_content_size(data)
        if declared is None:
            raise FormatError(f"zstd chunk declares no decoded size (the format requires it: {expected_bytes} bytes)")
        if declared != expected_bytes:
            raise FormatError(f"zstd chunk declares {declared} bytes, expected {expected_bytes}")
        end = zstd_frame_size(data)
        if end != len(data):
            raise FormatError(f"zstd chunk has {len(data) - end} bytes after its frame (a chunk is exactly one frame)")
        out = bytearray(expected_bytes)
        zstd.decompress(bytes(data), out)
        return np.frombuffer(out, dtype=dtype)
    from numcodecs import blosc

    if len(data) < _BLOSC_MAX_OVERHEAD:
        raise FormatError("truncated blosc chunk")
    nbytes, blocksize, cbytes = struct.unpack_from("<III", data, 4)
    if nbytes != expected_bytes or cbytes != len(data):
        raise FormatError(f"blosc chunk declares {nbytes} bytes in {cbytes}, expected {expected_bytes} in "
                          f"{len(data)}")
    _check_blosc_header(bytes(data[:4]), dtype.itemsize)
    if not 1 <= blocksize <= nbytes:
        raise FormatError(f"blosc chunk declares a block size of {blocksize} bytes for {nbytes} bytes")
    out = blosc.decompress(bytes(data))
    return np.frombuffer(out, dtype=dtype)


def _check_blosc_header(head: bytes, itemsize: int) -> None:
    """A c-blosc1 buffer as the array's metadata names it (cname zstd, byte shuffle, typesize = itemsize): the
    decoder follows the buffer's own flags, so a buffer naming another compressor or shuffle would decode through a
    codec the metadata does not name. Flags 0x02 (stored uncompressed) and 0x10 (blocks not split) are c-blosc's
    choice and are accepted either way."""
    version, version_lz, flags, typesize = head[:4]
    if version != _BLOSC_VERSION or version_lz != _BLOSC_ZSTD_VERSION:
        raise FormatError(f"blosc chunk of format version {version}.{version_lz}, expected "
                          f"{_BLOSC_VERSION}.{_BLOSC_ZSTD_VERSION} (c-blosc1 with zstd)")
    if flags >> 5 != _BLOSC_ZSTD or flags & 0x0D != 0x01:
        raise FormatError(f"blosc chunk flags 0x{flags:02x} name another compressor or shuffle than the metadata's "
                          "zstd with byte shuffle (expected 0x91, 0x93, 0x81 or 0x83)")
    if typesize != itemsize:
        raise FormatError(f"blosc chunk of type size {typesize}, expected {itemsize}")


class ShardValues:
    """Values of one ragged field in one shard, addressed by position inside the shard."""

    def __init__(self, buffer: Any, name: str, spec: RaggedSpec, capacity: int, inner_chunk: int,
                 cache: ChunkCache, cache_key: tuple):
        import google_crc32c

        self.spec, self.name = spec, name
        self.dtype = np.dtype(spec.dtype).newbyteorder("<")
        self.inner = inner_chunk
        self.chunk_bytes = inner_chunk * self.dtype.itemsize
        self.cache = cache
        self.cache_key = cache_key
        n_inner = capacity // inner_chunk
        index_size = 16 * n_inner + 4
        self._map = np.frombuffer(buffer, dtype=np.uint8)
        if self._map.size < index_size:
            raise FormatError(f"{name}: shard file of {self._map.size} bytes cannot hold its index")
        raw_index = bytes(self._map[-index_size:])
        if google_crc32c.value(raw_index[:-4]) != int.from_bytes(raw_index[-4:], "little"):
            raise FormatError(f"{name}: shard index fails its crc32c checksum")
        index = np.frombuffer(raw_index[:-4], dtype="<u8").reshape(n_inner, 2)
        present = index[:, 0] != _MISSING
        data_end = self._map.size - index_size
        offs, sizes = index[present, 0], index[present, 1]
        if np.any(offs > data_end) or np.any(sizes > data_end - np.minimum(offs, data_end)):
            raise FormatError(f"{name}: shard index points outside the file")
        if spec.codec == "raw" and np.any(sizes != self.chunk_bytes):
            raise FormatError(f"{name}: raw chunk sizes differ from {self.chunk_bytes} bytes")
        self.index = index
        self.present = present
        # Uncompressed shards written in order are one flat array: reads become plain slices of the map.
        count = int(present.sum())
        self.flat: np.ndarray | None = None
        if spec.codec == "raw" and present[:count].all() and np.array_equal(
                index[:count, 0], np.arange(count, dtype=np.uint64) * np.uint64(self.chunk_bytes)):
            self.flat = self._map[:count * self.chunk_bytes].view(self.dtype)

    def chunk(self, j: int) -> np.ndarray:
        key = (*self.cache_key, j)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if not self.present[j]:
            value = np.zeros(self.inner, dtype=self.dtype)
        else:
            off, size = int(self.index[j, 0]), int(self.index[j, 1])
            try:
                value = decode_chunk(self.spec.codec, memoryview(self._map[off:off + size]), self.dtype,
                                     self.chunk_bytes)
            except FormatError as exc:
                raise FormatError(f"{self.name}: {exc}") from None
        if self.spec.codec != "raw":
            self.cache.put(key, value)
        return value

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values at positions [start, stop) of this shard (a read-only view where possible)."""
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        flat = self.flat
        if flat is not None and stop <= flat.size:
            return flat[start:stop]
        first, last = start // self.inner, (stop - 1) // self.inner
        if first == last:
            base = first * self.inner
            return self.chunk(first)[start - base:stop - base]
        pieces = [self.chunk(j) for j in range(first, last + 1)]
        base = first * self.inner
        return np.concatenate(pieces)[start - base:stop - base]
