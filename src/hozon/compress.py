"""zstd compression of blob payloads, with one compressor per thread (they are not thread-safe).

A payload starts with one byte that says how the rest is stored, so incompressible data (random,
already compressed) is kept raw instead of growing; with compression off every payload is kept raw,
which every reader already reads.
"""

from __future__ import annotations

import threading

import zstandard

RAW = 0
ZSTD = 1
DEFAULT_LEVEL = 3
LEVELS: dict[str, int | None] = {"auto": DEFAULT_LEVEL, "off": None, "fast": 1, "max": 19}  # --compression

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    comp = getattr(_local, key, None)
    if comp is None:
        comp = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, comp)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "d", None)
    if dec is None:
        dec = _local.d = zstandard.ZstdDecompressor()
    return dec


def compress(data: bytes | memoryview, level: int | None = DEFAULT_LEVEL) -> bytes:
    """The payload of ``data``: zstd at ``level``, or raw when that is not smaller or ``level`` is None."""
    if level is None:
        return bytes((RAW,)) + bytes(data)
    packed = _compressor(level).compress(data)
    if len(packed) < len(data):
        return bytes((ZSTD,)) + packed
    return bytes((RAW,)) + bytes(data)


def decompress(payload: bytes) -> bytes:
    if not payload:
        raise ValueError("empty payload")
    if payload[0] == RAW:
        return payload[1:]
    if payload[0] == ZSTD:
        return bytes(_decompressor().decompress(memoryview(payload)[1:]))
    raise ValueError(f"unknown compression byte {payload[0]}")
