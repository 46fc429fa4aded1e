"""How big snapshots are: as restored, and as stored (``hozon stats``).

Two questions, as restic asks them: how much would restoring these snapshots write
(``restore-size``: file sizes and disk sizes, per snapshot, so shared data counts every time), and
what do they take in the repository (``raw-data``: each blob they reference counted once, before
and after compression). Their quotient is the deduplication ratio.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hozon.repo.imagemap import decode_map, map_ids, mapped_entries, zero_mask
from hozon.repo.pack import BLOB_TYPES
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import DIR, FILE

RESTORE_SIZE = "restore-size"
RAW_DATA = "raw-data"
MODES = (RESTORE_SIZE, RAW_DATA)


@dataclass
class Stats:
    snapshots: int = 0
    files: int = 0  # regular files in file snapshots (each hard-linked file once per snapshot)
    disks: int = 0  # disks (and checkpoint states) in image snapshots
    restore_size: int = 0  # bytes a restore of every snapshot would write
    blobs: dict[str, int] = field(default_factory=dict)  # raw-data: unique blobs by type
    raw_size: int = 0  # raw-data: their bytes before compression and encryption
    stored_size: int = 0  # raw-data: their bytes in the packs

    @property
    def compression_ratio(self) -> float:
        return self.raw_size / self.stored_size if self.stored_size else 0.0

    @property
    def dedup_ratio(self) -> float:
        return self.restore_size / self.raw_size if self.raw_size else 0.0

    def to_json(self, mode: str) -> dict[str, object]:
        doc: dict[str, object] = {"mode": mode, "snapshots": self.snapshots, "files": self.files,
                                  "disks": self.disks, "restore_size": self.restore_size}
        if mode == RAW_DATA:
            doc.update(blobs=self.blobs, blob_count=sum(self.blobs.values()), raw_size=self.raw_size,
                       stored_size=self.stored_size, compression_ratio=round(self.compression_ratio, 3),
                       dedup_ratio=round(self.dedup_ratio, 3))
        return doc


def snapshot_stats(repo: Repository, snapshots: Iterable[Snapshot], mode: str) -> Stats:
    """Statistics of ``snapshots`` in a repository whose index is loaded."""
    stats = Stats()
    referenced: list[bytes] = []  # raw-data: every blob id met (duplicates removed at the end)
    walked: set[str] = set()  # raw-data: trees whose blobs were collected already
    for snap in snapshots:
        stats.snapshots += 1
        if snap.tree is None:
            _image(repo, snap, stats, referenced if mode == RAW_DATA else None)
        else:
            _files(repo, snap.tree, stats, referenced if mode == RAW_DATA else None, walked)
    if mode == RAW_DATA:
        _raw_sizes(repo, _unique(referenced), stats)
    return stats


def _files(repo: Repository, root: str, stats: Stats, referenced: list[bytes] | None, walked: set[str]) -> None:
    links: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        tree_id = stack.pop()
        first_visit = tree_id not in walked
        if referenced is not None and first_visit:
            walked.add(tree_id)
            referenced.append(bytes.fromhex(tree_id))
        for node in repo.load_tree(tree_id):
            if node.type == DIR and node.subtree:
                stack.append(node.subtree)
            elif node.type == FILE:
                if node.links > 1:
                    if (node.device, node.inode) in links:
                        continue
                    links.add((node.device, node.inode))
                stats.files += 1
                stats.restore_size += node.size
                if referenced is not None and first_visit:
                    referenced.extend(bytes.fromhex(c) for c in node.content)


def _image(repo: Repository, snap: Snapshot, stats: Stats, referenced: list[bytes] | None) -> None:
    for what, entry in mapped_entries(snap.extra):
        stats.disks += 1
        stats.restore_size += int(entry.get("size", 0))
        if referenced is None:
            continue
        for map_id in map_ids(entry):
            referenced.append(map_id)
            ids = decode_map(repo.load_blob(map_id), f"{what} of snapshot {snap.short_id}")
            referenced.extend(row.tobytes() for row in ids[~zero_mask(ids)])


def _unique(ids: list[bytes]) -> npt.NDArray[np.uint8]:
    if not ids:
        return np.zeros((0, 32), np.uint8)
    table = np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32)
    return np.unique(table, axis=0)


def _raw_sizes(repo: Repository, ids: npt.NDArray[np.uint8], stats: Stats) -> None:
    """Stored and raw bytes of each blob: stored lengths are in the loaded index, raw lengths only in
    the index files, so those are read once more and matched to the loaded rows."""
    rows = repo.index.positions(ids)
    rows = rows[rows >= 0]
    raw_by_row = np.zeros(len(repo.index.hi), np.int64)
    for name in repo.index_files:
        entries = repo.decode_index_file(name).entries
        found = repo.index.positions(np.ascontiguousarray(entries["id"]).view(np.uint8).reshape(-1, 32))
        ok = found >= 0
        raw_by_row[found[ok]] = entries["raw_length"][ok]
    stats.stored_size = int(repo.index.length[rows].astype(np.int64).sum())
    stats.raw_size = int(raw_by_row[rows].sum())
    types = repo.index.type[rows]
    stats.blobs = {name: int((types == number).sum()) for number, name in BLOB_TYPES.items()}
