"""What changed between two image snapshots of one VM: disk regions, and a checkpoint's memory.

Both snapshots list every chunk of every disk (``imagemap``), so comparing the two id maps entry
by entry gives the changed regions exactly, at the disks' chunk granularity, without reading any
data. A checkpoint's state stream is cut by content, so its chunks do not line up by position:
what changed there is the bytes of the newer stream's chunks that the older stream lacks.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hozon.errors import CorruptData, UsageError
from hozon.repo.imagemap import decode_map, image_disks, map_ids
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot


@dataclass(frozen=True)
class DiskChange:
    name: str
    status: str  # "changed", "unchanged", "added", "removed", "resized"
    size: int
    chunk_size: int
    regions: list[tuple[int, int]] = field(default_factory=list)  # (offset, length), merged
    changed_bytes: int = 0


@dataclass(frozen=True)
class MemoryChange:
    size: int  # the newer state stream's bytes
    changed_bytes: int  # of those, in chunks the older stream lacks


@dataclass(frozen=True)
class ImageDiff:
    disks: list[DiskChange]
    memory: MemoryChange | None  # both snapshots checkpoints


def diff_images(repo: Repository, older: Snapshot, newer: Snapshot) -> ImageDiff:
    """Per disk the changed regions and bytes; for two checkpoints also how much of the memory changed."""
    for snap in (older, newer):
        if snap.tree is not None:
            raise UsageError(f"snapshot {snap.short_id} is a file snapshot; an image diff compares two image "
                             "snapshots of one VM")
    if older.extra.get("vm") != newer.extra.get("vm"):
        raise UsageError(f"snapshots {older.short_id} and {newer.short_id} are of different VMs "
                         f"({older.extra.get('vm')} and {newer.extra.get('vm')})")
    before = {str(d.get("name")): d for d in image_disks(older.extra)}
    after = {str(d.get("name")): d for d in image_disks(newer.extra)}
    disks: list[DiskChange] = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            doc = new or old
            assert doc is not None
            disks.append(DiskChange(name, "added" if old is None else "removed", int(doc["size"]),
                                    int(doc["chunk_size"])))
            continue
        disks.append(_disk_change(repo, name, old, new, newer))
    memory = None
    if older.kind == newer.kind == "checkpoint":
        memory = _memory_change(repo, older, newer)
    return ImageDiff(disks, memory)


def _ids(repo: Repository, doc: dict[str, Any]) -> npt.NDArray[np.uint8]:
    parts = [decode_map(repo.load_blob(m), f"map blob {m.hex()[:16]}") for m in map_ids(doc)]
    return np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)


def _disk_change(repo: Repository, name: str, old: dict[str, Any], new: dict[str, Any],
                 newer: Snapshot) -> DiskChange:
    size, chunk = int(new["size"]), int(new["chunk_size"])
    if int(old["size"]) != size or int(old["chunk_size"]) != chunk:
        return DiskChange(name, "resized", size, chunk, [(0, size)], size)
    a, b = _ids(repo, old), _ids(repo, new)
    if len(a) != len(b):
        raise CorruptData(f"snapshots/{newer.id}", f"the map of disk {name} does not cover its size")
    changed = np.flatnonzero(np.any(a != b, axis=1))
    regions: list[tuple[int, int]] = []
    if len(changed):
        breaks = np.flatnonzero(np.diff(changed) > 1)
        starts = np.concatenate(([changed[0]], changed[breaks + 1]))
        ends = np.concatenate((changed[breaks], [changed[-1]]))
        for first, last in zip(starts.tolist(), ends.tolist(), strict=True):
            offset = first * chunk
            regions.append((offset, min((last + 1) * chunk, size) - offset))
    total = sum(length for _, length in regions)
    return DiskChange(name, "changed" if regions else "unchanged", size, chunk, regions, total)


def _memory_change(repo: Repository, older: Snapshot, newer: Snapshot) -> MemoryChange:
    old_state, new_state = older.extra["state"], newer.extra["state"]
    known = {bytes(row) for row in _ids(repo, old_state)}
    ids = _ids(repo, new_state)
    try:
        lengths = np.frombuffer(base64.b64decode(str(new_state.get("lengths", ""))), "<u4")
    except ValueError as exc:
        raise CorruptData(f"snapshots/{newer.id}", f"the state's chunk lengths are malformed ({exc})") from None
    if len(lengths) != len(ids):
        raise CorruptData(f"snapshots/{newer.id}", "the state lists more chunks than lengths")
    fresh = np.array([bytes(row) not in known for row in ids], bool)
    return MemoryChange(int(lengths.sum()), int(lengths[fresh].sum()) if len(ids) else 0)
