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

import numpy as np
import numpy.typing as npt

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


def decode_index(key: str, data: bytes) -> list[PackRecord]:
    if not data.startswith(MAGIC):
        raise CorruptData(key, "not an index file")
    packs: list[PackRecord] = []
    pos = len(MAGIC)
    try:
        while pos < len(data):
            raw_name, condemned_at, count = _PACK.unpack_from(data, pos)
            pos += _PACK.size
            end = pos + count * ENTRY_DTYPE.itemsize
            if end > len(data):
                raise CorruptData(key, "index file is truncated")
            entries = np.frombuffer(data, dtype=ENTRY_DTYPE, count=count, offset=pos)
            packs.append(PackRecord(raw_name.hex(), entries, condemned_at))
            pos = end
    except struct.error as exc:
        raise CorruptData(key, "index file is truncated") from exc
    return packs


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

    def load(self, files: Iterable[list[PackRecord]]) -> None:
        """Replace the contents with the union of index files; a live listing of a pack wins."""
        cols: dict[str, list[npt.NDArray[np.generic]]] = {k: [] for k in ("hi", "lo", "pack", "off", "len", "t")}
        condemned: dict[int, int] = {}
        live: set[int] = set()
        for records in files:
            for rec in records:
                number = self.pack_number(rec.name)
                if rec.condemned_at:
                    condemned[number] = max(condemned.get(number, 0), rec.condemned_at)
                else:
                    live.add(number)
                ids = np.ascontiguousarray(rec.entries["id"]).view(np.uint8).reshape(-1, 32)
                hi, lo = id_words(ids)
                cols["hi"].append(hi)
                cols["lo"].append(lo)
                cols["pack"].append(np.full(len(rec.entries), number, np.uint32))
                cols["off"].append(rec.entries["offset"].astype(np.uint32))
                cols["len"].append(rec.entries["length"].astype(np.uint32))
                cols["t"].append(rec.entries["type"].astype(np.uint8))
        self.condemned = {n: t for n, t in condemned.items() if n not in live}

        def cat(name: str, dtype: type) -> npt.NDArray[np.generic]:
            parts = cols.pop(name)
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        hi, lo, pack = cat("hi", np.uint64), cat("lo", np.uint64), cat("pack", np.uint32)
        is_condemned = np.zeros(len(self.packs), bool)
        is_condemned[list(self.condemned)] = True
        order = np.lexsort((is_condemned[pack], lo, hi))  # live copies of a blob first
        hi, lo, pack = hi[order], lo[order], pack[order]
        keep = np.ones(len(hi), bool)
        keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.hi, self.lo, self.pack = hi[keep], lo[keep], pack[keep]
        del hi, lo, pack
        self.offset = cat("off", np.uint32)[order][keep]
        self.length = cat("len", np.uint32)[order][keep]
        self.type = cat("t", np.uint8)[order][keep]
        self._pending.clear()

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
