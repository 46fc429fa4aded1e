"""The index: which pack holds each blob, on disk and in memory.

On disk an index file lists packs and their blobs (see docs/format.md). In memory the index must
stay small at tens of millions of chunks, so it is a set of sorted numpy columns rather than a dict
of bytes: 29 bytes per blob. Ids are kept to their first 128 bits in memory (a false match among
10^7 chunks has odds near 10^-25); every blob read is verified against its full 256-bit id.

A pack entry may carry ``condemned_at``: prune found it unused and will delete it once every backup
that started before that time has ended. Condemned blobs still serve reads, never deduplication.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hozon.allocator import release_free_memory
from hozon.errors import CorruptData

MAGIC = b"HZI1"
_PACK = struct.Struct("<32sqI")
ENTRY_DTYPE = np.dtype(
    [("type", "u1"), ("id", "V32"), ("offset", "<u4"), ("length", "<u4"), ("raw_length", "<u4")]
)


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int
    blob_type: int


@dataclass
class PackRecord:
    """One pack as an index file lists it."""

    name: str
    entries: npt.NDArray[np.void]  # ENTRY_DTYPE
    condemned_at: int = 0


def encode_index(packs: Iterable[PackRecord]) -> bytes:
    parts = [MAGIC]
    for pack in packs:
        parts.append(_PACK.pack(bytes.fromhex(pack.name), pack.condemned_at, len(pack.entries)))
        parts.append(pack.entries.astype(ENTRY_DTYPE, copy=False).tobytes())
    return b"".join(parts)


@dataclass
class IndexFile:
    """One decoded index file as flat columns: the entries of all its packs, in order."""

    names: list[str]
    condemned_at: list[int]
    counts: npt.NDArray[np.int64]
    entries: npt.NDArray[np.void]  # ENTRY_DTYPE

    @classmethod
    def from_records(cls, records: list[PackRecord]) -> IndexFile:
        entries = np.concatenate([r.entries for r in records]) if records else np.zeros(0, ENTRY_DTYPE)
        counts = np.array([len(r.entries) for r in records], np.int64)
        return cls([r.name for r in records], [r.condemned_at for r in records], counts, entries)

    def records(self) -> list[PackRecord]:
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        return [PackRecord(name, self.entries[bounds[i] : bounds[i + 1]], self.condemned_at[i])
                for i, name in enumerate(self.names)]


def decode_index(key: str, data: bytes) -> IndexFile:
    if not data.startswith(MAGIC):
        raise CorruptData(key, "not an index file")
    names: list[str] = []
    condemned_at: list[int] = []
    counts: list[int] = []
    spans: list[memoryview] = []
    view = memoryview(data)
    pos = len(MAGIC)
    try:
        while pos < len(data):
            raw_name, condemned, count = _PACK.unpack_from(data, pos)
            pos += _PACK.size
            end = pos + count * ENTRY_DTYPE.itemsize
            if end > len(data):
                raise CorruptData(key, "index file is truncated")
            names.append(raw_name.hex())
            condemned_at.append(condemned)
            counts.append(count)
            spans.append(view[pos:end])
            pos = end
    except struct.error as exc:
        raise CorruptData(key, "index file is truncated") from exc
    entries = np.frombuffer(b"".join(spans), dtype=ENTRY_DTYPE)
    return IndexFile(names, condemned_at, np.array(counts, np.int64), entries)


def id_words(ids: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Split (n, >=16) id bytes into two big-endian uint64 columns that sort like the bytes."""
    words = np.ascontiguousarray(ids[:, :16]).view(">u8").reshape(-1, 2)
    return words[:, 0].astype(np.uint64), words[:, 1].astype(np.uint64)


class ChunkIndex:
    """Blob id → location for a whole repository, plus what this process added since loading."""

    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self.condemned: dict[int, int] = {}  # pack number → condemned_at, for condemned-only packs
        self.hi = np.zeros(0, np.uint64)
        self.lo = np.zeros(0, np.uint64)
        self.pack = np.zeros(0, np.uint32)
        self.offset = np.zeros(0, np.uint32)
        self.length = np.zeros(0, np.uint32)
        self.type = np.zeros(0, np.uint8)
        self._pending: dict[bytes, tuple[int, int, int, int]] = {}
        self._lock = threading.Lock()

    # -- building -------------------------------------------------------------------------------
    def pack_number(self, name: str) -> int:
        number = self._pack_no.get(name)
        if number is None:
            number = self._pack_no[name] = len(self.packs)
            self.packs.append(name)
        return number

    def load(self, files: Iterable[IndexFile]) -> None:
        """Replace the contents with the union of index files; a live listing of a pack wins.

        Each file is turned into compact columns as it arrives, and the columns are joined and
        permuted one at a time, so the peak stays well under twice the result.
        """
        parts: dict[str, list[npt.NDArray[Any]]] = {k: [] for k in ("hi", "lo", "pack", "offset", "length", "type")}
        condemned: dict[int, int] = {}
        live: set[int] = set()
        for f in files:
            numbers = np.array([self.pack_number(name) for name in f.names], np.uint32)
            for number, when in zip(numbers.tolist(), f.condemned_at, strict=True):
                if when:
                    condemned[number] = max(condemned.get(number, 0), when)
                else:
                    live.add(number)
            hi, lo = id_words(np.ascontiguousarray(f.entries["id"]).view(np.uint8).reshape(-1, 32))
            parts["hi"].append(hi)
            parts["lo"].append(lo)
            parts["pack"].append(np.repeat(numbers, f.counts))
            parts["offset"].append(f.entries["offset"].astype(np.uint32))
            parts["length"].append(f.entries["length"].astype(np.uint32))
            parts["type"].append(f.entries["type"].astype(np.uint8))
        self.condemned = {n: t for n, t in condemned.items() if n not in live}

        def column(name: str, dtype: type) -> npt.NDArray[Any]:
            pieces = parts.pop(name)
            return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)

        # One column at a time: join, permute into sorted order, free the pieces.
        hi = column("hi", np.uint64)
        order = np.argsort(hi)
        hi.sort()
        lo = column("lo", np.uint64)[order]
        pack = column("pack", np.uint32)[order]
        same = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])  # one blob listed in several packs
        keep: npt.NDArray[np.bool_] | slice = slice(None)
        if same.any():
            swaps = self._prefer_live_copies(pack, np.flatnonzero(same) + 1)
            for a, b in swaps:
                order[a], order[b] = order[b], order[a]
            keep = np.concatenate([[True], ~same])
            hi, lo, pack, order = hi[keep], lo[keep], pack[keep], order[keep]
        self.hi, self.lo, self.pack = hi, lo, pack
        del hi, lo, pack
        self.offset = column("offset", np.uint32)[order]
        self.length = column("length", np.uint32)[order]
        self.type = column("type", np.uint8)[order]
        self._pending.clear()
        release_free_memory()  # the loader's temporaries, kept by the allocator otherwise

    def _prefer_live_copies(
        self, pack: npt.NDArray[np.uint32], duplicates: npt.NDArray[np.intp]
    ) -> list[tuple[int, int]]:
        """Within each run of copies of one blob, move a copy in a live pack to the front (rare)."""
        swaps: list[tuple[int, int]] = []
        for i in duplicates[::-1].tolist():
            if int(pack[i - 1]) in self.condemned and int(pack[i]) not in self.condemned:
                pack[i - 1], pack[i] = pack[i], pack[i - 1]
                swaps.append((i - 1, i))
        return swaps

    def add(self, blob_id: bytes, pack: str, offset: int, length: int, blob_type: int) -> None:
        with self._lock:
            self._pending[blob_id[:16]] = (self.pack_number(pack), offset, length, blob_type)

    # -- lookups --------------------------------------------------------------------------------
    def _find(self, blob_id: bytes) -> int:
        hi = np.uint64(int.from_bytes(blob_id[:8], "big"))
        lo = np.uint64(int.from_bytes(blob_id[8:16], "big"))
        i = int(np.searchsorted(self.hi, hi))
        while i < len(self.hi) and self.hi[i] == hi:
            if self.lo[i] == lo:
                return i
            i += 1
        return -1

    def lookup(self, blob_id: bytes) -> Location | None:
        """Where a blob can be read from (condemned packs included)."""
        pending = self._pending.get(blob_id[:16])
        if pending is not None:
            number, offset, length, blob_type = pending
            return Location(self.packs[number], offset, length, blob_type)
        i = self._find(blob_id)
        if i < 0:
            return None
        return Location(self.packs[int(self.pack[i])], int(self.offset[i]), int(self.length[i]), int(self.type[i]))

    def has_live(self, blob_id: bytes) -> bool:
        """Whether a backup may reference this blob without storing it again."""
        if blob_id[:16] in self._pending:
            return True
        i = self._find(blob_id)
        return i >= 0 and int(self.pack[i]) not in self.condemned

    def live_mask(self, ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
        """:meth:`has_live` for many ids ((n, 32) bytes) at once."""
        rows = self.positions(ids)
        live = rows >= 0
        if self.condemned and live.any():
            live[live] = ~np.isin(self.pack[rows[live]], np.fromiter(self.condemned, np.int64))
        if self._pending:
            for j in np.flatnonzero(rows < 0):
                live[j] = ids[j, :16].tobytes() in self._pending
        return live

    def positions(self, ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Vectorised lookup of many ids ((n, 32) bytes): their rows here, or -1 (pending ones too)."""
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        hi, lo = id_words(ids)
        left = np.searchsorted(self.hi, hi, side="left")
        right = np.searchsorted(self.hi, hi, side="right")
        result = np.full(len(ids), -1, np.int64)
        single = (right - left) == 1
        idx = left[single]
        match = self.lo[idx] == lo[single]
        result[np.flatnonzero(single)[match]] = idx[match]
        for j in np.flatnonzero(right - left > 1):  # 64-bit prefix shared: rare, check each
            for i in range(int(left[j]), int(right[j])):
                if self.lo[i] == lo[j]:
                    result[j] = i
        return result

    def __len__(self) -> int:
        return len(self.hi) + len(self._pending)

    def memory_bytes(self) -> int:
        arrays = (self.hi, self.lo, self.pack, self.offset, self.length, self.type)
        return sum(a.nbytes for a in arrays)

