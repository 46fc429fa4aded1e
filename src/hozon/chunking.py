"""Cutting byte streams into chunks.

Files use content-defined chunking (FastCDC), so an insertion shifts only the chunks around it and
the rest still deduplicates; the gear table is seeded per repository so cut points leak nothing.
Disk images use fixed-size chunks aligned to disk offsets (see the image backup), where blocks never
shift and alignment lets a changed-block map name exactly the chunks to re-read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol, cast

from pyfastcdc import FastCDC

CDC_MIN = 512 * 1024
CDC_AVG = 1024 * 1024
CDC_MAX = 8 * 1024 * 1024
FIXED_SIZE = 1024 * 1024


class Readable(Protocol):
    """What the chunker reads from: a file, a pipe, a VM's state stream."""

    def readinto(self, buffer: memoryview) -> int: ...


class _Limited:
    """A readinto() view of the next ``remaining`` bytes of a file (one data extent)."""

    def __init__(self, raw: BinaryIO | Readable, remaining: int) -> None:
        self._raw = raw
        self.remaining = remaining

    def readinto(self, buf: memoryview) -> int:
        if self.remaining <= 0:
            return 0
        view = buf[: min(len(buf), self.remaining)]
        n = cast(Readable, self._raw).readinto(view)  # a binary file has readinto too
        n = n or 0
        self.remaining -= n
        return int(n)


class ContentChunker:
    """FastCDC with the repository's seed; reusable, not shared between threads."""

    def __init__(self, seed: int, average: int = CDC_AVG) -> None:
        # pyfastcdc's min/avg arguments: the real average is avg_size + min_size (see its docs).
        minimum, maximum = average // 2, average * 8
        self._cdc = FastCDC(average - minimum, min_size=minimum, max_size=maximum, seed=seed)

    def chunks(self, stream: BinaryIO | Readable, length: int | None = None) -> Iterator[bytes]:
        """Yield the chunks of ``stream`` (up to ``length`` bytes when given) as independent bytes."""
        source = _Limited(stream, length) if length is not None else stream
        for chunk in self._cdc.cut_stream(source):
            yield bytes(chunk.data)  # the view is reused by the next chunk: copy it out


def fixed_chunks(stream: BinaryIO, length: int, size: int = FIXED_SIZE) -> Iterator[bytes]:
    """Yield ``length`` bytes of ``stream`` in chunks of ``size`` (the last may be shorter)."""
    remaining = length
    while remaining > 0:
        data = stream.read(min(size, remaining))
        if not data:
            return
        remaining -= len(data)
        yield data
