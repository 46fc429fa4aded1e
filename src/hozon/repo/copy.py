"""Copying snapshots from one repository into another (local, S3, a Hozon server: any two backends).

Blob ids are keyed hashes, so a blob's id in the target is the target key's hash of its plaintext.
With one master key on both sides the ids are the same and a blob the target holds is skipped
without being read; with different keys each blob is read (the source side), hashed with the
target's key and stored only if the target lacks it. Trees and disk maps name their blobs by id, so
they are rewritten with the target's ids. Only what the target lacks is uploaded, and a copied
snapshot records where it came from (``extra["copied_from"]``), so running a copy again copies
only new snapshots.

Order is the backup's: packs, then index, then the snapshot; afterwards every copied snapshot is
verified in the target (every tree and map read back, every blob they name present in its index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hozon.errors import CorruptData
from hozon.repo.backends.retain import RetainedWrites
from hozon.repo.imagemap import ZERO_ID, decode_map, encode_map, mapped_entries, zero_mask
from hozon.repo.pack import DATA, MAP, TREE, pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import Node, encode_tree
from hozon.repo.writer import BlobWriter, WriteStats

COPIED_FROM = "copied_from"


@dataclass
class CopyResult:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source id, target id)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # copied earlier: (source id, target id)
    stats: WriteStats = field(default_factory=WriteStats)


def copied_sources(target: Repository, source: Repository) -> dict[str, str]:
    """Source snapshot id → target snapshot id, for the copies ``target`` holds of ``source``'s snapshots."""
    found: dict[str, str] = {}
    for snap in target.list_snapshots():
        origin = snap.extra.get(COPIED_FROM)
        if isinstance(origin, dict) and origin.get("repository") == source.config["id"]:
            found[str(origin.get("snapshot"))] = snap.id
    return found


def copy_snapshots(source: Repository, target: Repository, snapshots: list[Snapshot],
                   say: Callable[[str], None] = lambda _m: None) -> CopyResult:
    """Copy ``snapshots`` (oldest first) that ``target`` does not hold yet; both indexes must be loaded."""
    result = CopyResult()
    done = copied_sources(target, source)
    todo = []
    for snap in sorted(snapshots, key=lambda s: s.time):
        if snap.id in done:
            result.skipped.append((snap.id, done[snap.id]))
        else:
            todo.append(snap)
    if not todo:
        return result
    same_key = source.master.id_key == target.master.id_key
    with BlobWriter(target) as writer:
        copier = _Copier(source, target, writer, same_key)
        rewritten = []
        for snap in todo:
            say(f"copying snapshot {snap.short_id}")
            rewritten.append((snap, copier.snapshot(snap, done)))
    result.stats = writer.stats
    if isinstance(target.backend, RetainedWrites):  # reused packs must stay as long as the new copies
        packs = {loc.pack for loc in map(target.index.lookup, copier.ids.values()) if loc is not None}
        for name in sorted(packs):
            target.backend.retain(pack_key(name))
    for snap, copy in rewritten:  # packs and index are stored: now the snapshots may name them
        target.save_snapshot(copy)
        done[snap.id] = copy.id
        result.copied.append((snap.id, copy.id))
    for _source_id, target_id in result.copied:
        verify_copy(target, target.load_snapshot(target_id))
    return result


class _Copier:
    def __init__(self, source: Repository, target: Repository, writer: BlobWriter, same_key: bool) -> None:
        self.source, self.target, self.writer, self.same_key = source, target, writer, same_key
        self.ids: dict[bytes, bytes] = {}  # source id → target id (trees included)

    def snapshot(self, snap: Snapshot, done: dict[str, str]) -> Snapshot:
        extra: dict[str, Any] = dict(snap.extra)
        if isinstance(extra.get("disks"), list):
            extra["disks"] = [self._mapped(d) if isinstance(d, dict) else d for d in extra["disks"]]
        if isinstance(extra.get("state"), dict):
            extra["state"] = self._mapped(extra["state"])
        extra[COPIED_FROM] = {"repository": self.source.config["id"], "snapshot": snap.id}
        tree = self._tree(snap.tree) if snap.tree else None
        parent = done.get(snap.parent) if snap.parent else None
        return replace(snap, tree=tree, extra=extra, parent=parent, id="")

    def blob(self, blob_id: bytes, blob_type: int) -> bytes:
        """The target's id of source blob ``blob_id``, storing the blob there if it lacks it."""
        if blob_id == ZERO_ID and blob_type == DATA:
            return blob_id  # a zero chunk is stored nowhere
        known = self.ids.get(blob_id)
        if known is not None:
            return known
        if self.same_key and self.target.index.has_live(blob_id):
            new = blob_id
        else:
            new = self.writer.store(self.source.load_blob(blob_id), blob_type)
        self.ids[blob_id] = new
        return new

    def _tree(self, tree_id: str) -> str:
        """The target's id of a directory's tree, rewritten with the target's ids (an unchanged one once)."""
        known = self.ids.get(bytes.fromhex(tree_id))
        if known is not None:
            return known.hex()
        nodes: list[Node] = [
            replace(n, content=[self.blob(bytes.fromhex(c), DATA).hex() for c in n.content],
                    subtree=self._tree(n.subtree) if n.subtree else None)
            for n in self.source.load_tree(tree_id)]
        new = self.writer.store(encode_tree(nodes), TREE)
        self.ids[bytes.fromhex(tree_id)] = new
        return new.hex()

    def _mapped(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A disk (or VM state) entry whose map blobs name the target's ids."""
        maps = []
        for map_id in entry.get("maps", []):
            ids = decode_map(self.source.load_blob(bytes.fromhex(map_id)), f"map {map_id[:16]}").copy()
            for row in np.flatnonzero(~zero_mask(ids)):
                ids[row] = np.frombuffer(self.blob(ids[row].tobytes(), DATA), np.uint8)
            maps.append(self.writer.store(encode_map(ids), MAP).hex())
        return {**entry, "maps": maps}


def verify_copy(target: Repository, snap: Snapshot) -> None:
    """Read back every tree and map of ``snap`` from ``target``; every blob they name must be indexed."""
    missing: list[str] = []

    def need(blob_id: bytes) -> None:
        if blob_id != ZERO_ID and target.index.lookup(blob_id) is None:
            missing.append(blob_id.hex()[:16])

    stack = [snap.tree] if snap.tree else []
    while stack:
        for node in target.load_tree(stack.pop()):
            for chunk in node.content:
                need(bytes.fromhex(chunk))
            if node.subtree:
                need(bytes.fromhex(node.subtree))
                stack.append(node.subtree)
    for _what, entry in mapped_entries(snap.extra):
        for map_id in entry.get("maps", []):
            for row in decode_map(target.load_blob(bytes.fromhex(map_id)), f"map {map_id[:16]}"):
                need(row.tobytes())
    if missing:
        raise CorruptData(f"snapshots/{snap.id}", f"the copy names {len(missing)} blob(s) the target lacks, "
                          f"such as {missing[0]}")
