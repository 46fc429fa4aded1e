"""Repairing a damaged repository: the index from the packs, and snapshots without what is lost.

``repair_index`` (under an exclusive lock) reads every pack's header and writes index files for
the readable packs, keeping the condemned stamps that readable old index files give; then it
deletes the old index files (new before old, as prune does: a crash leaves a blob listed twice,
which is allowed). Packs whose header cannot be read are reported and left alone.

``repair_snapshots`` (exclusive too) lets ``check`` find what is lost: blobs in no index, in a
missing pack, or (with read_data) failing their checks. Every file snapshot that uses any of it
is written again as a new snapshot with the same time, host, paths and tags, plus the tag
``repaired`` and ``extra["repaired_from"]``:

- a file whose content is not all readable is left out, not truncated or zero-filled: a restored
  file must never look whole when it is not, and the command lists every file it left out;
- a directory whose listing is lost stays, empty; a lost root gives an empty snapshot.

Image snapshots (VMs, checkpoints) with lost chunks are not repaired: a disk restored with zeros
where chunks are lost would boot into silent corruption; they are reported, to be forgotten once
nothing more can be got from them. Then the index drops the packs that are missing from ``data/``
(no backup may deduplicate against them any more), and with ``forget`` the originals go. A pack
that is there but holds damaged blobs stays indexed: once no snapshot uses those blobs, a prune
that repacks it (``--repack-threshold 1``) copies its good blobs out and deletes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hozon.errors import CorruptData, HozonError
from hozon.repo.check import CheckProgress, Damage, find_damage
from hozon.repo.index import PackRecord
from hozon.repo.pack import TREE
from hozon.repo.prune import IndexWriter
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import DIR, Node, encode_tree
from hozon.repo.writer import BlobWriter, pack_record

REPAIRED_TAG = "repaired"
LOST_CONTENT = "left out: part of its content is lost"
LOST_LISTING = "emptied: its listing is lost"
IMAGE_REFUSED = ("image snapshots are not repaired: a disk with lost chunks would restore with wrong bytes; "
                 "restore what you can from it, then forget it")

Say = Callable[[str], None]


# -- repair index ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexRepair:
    packs: int  # packs indexed
    blobs: int
    unreadable: tuple[str, ...]  # why each unreadable pack was left out
    dropped: tuple[str, ...]  # packs the old index named that are not in data/
    damaged_index_files: tuple[str, ...]
    written: int
    removed: int


def repair_index(repo: Repository, say: Say | None = None) -> IndexRepair:
    """Rebuild the index of ``repo`` (locked exclusively by the caller) from its packs' headers."""
    say = say or (lambda _m: None)
    old = sorted(e.key.rsplit("/", 1)[-1] for e in repo.backend.list("index"))
    stamps, damaged = _old_stamps(repo, old)
    present = sorted(repo.list_packs())
    say(f"reading the headers of {len(present)} pack(s)")
    out = IndexWriter(repo)
    unreadable: list[str] = []
    blobs = 0
    for name in present:
        try:
            _data, entries = repo.read_pack(name)
        except HozonError as exc:  # damaged, or a read error: either way its blobs cannot be indexed
            unreadable.append(exc.message)
            continue
        record = pack_record(name, entries)
        record.condemned_at = stamps.get(name, 0)
        out.add(record)
        blobs += len(entries)
    out.flush()
    written = set(out.written)
    gone = [name for name in old if name not in written]  # an unencrypted index may come out byte-identical
    for name in gone:
        repo.backend.delete(f"index/{name}")
    here = set(present)
    return IndexRepair(
        packs=len(present) - len(unreadable), blobs=blobs, unreadable=tuple(unreadable),
        dropped=tuple(sorted(p for p in stamps if p not in here)), damaged_index_files=tuple(damaged),
        written=len(written), removed=len(gone),
    )


def _old_stamps(repo: Repository, names: list[str]) -> tuple[dict[str, int], list[str]]:
    """Each pack the readable index files name, with its condemned stamp (0 if any of them lists it
    live, as when the index is loaded); and what is wrong with the unreadable files."""
    stamps: dict[str, int] = {}
    damaged: list[str] = []
    for name in names:
        try:
            f = repo.decode_index_file(name)
        except CorruptData as exc:
            damaged.append(exc.message)
            continue
        for pack, when in zip(f.names, f.condemned_at, strict=True):
            before = stamps.get(pack)
            stamps[pack] = 0 if when == 0 or before == 0 else max(before or 0, when)
    return stamps, damaged


# -- repair snapshots -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    path: str
    what: str  # LOST_CONTENT or LOST_LISTING


@dataclass
class SnapshotRepair:
    original: Snapshot
    changes: list[Change] = field(default_factory=list)
    repaired: Snapshot | None = None  # its id is empty on a dry run
    refused: str = ""  # why it was not repaired


@dataclass
class SnapshotsRepair:
    dry_run: bool
    snapshots: list[SnapshotRepair] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # snapshot files that do not load
    dropped_packs: list[str] = field(default_factory=list)  # missing packs dropped from the index
    damaged_packs: list[str] = field(default_factory=list)  # present, with blobs that fail (read_data)
    forgotten: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> bool:
        """Damage left that this repair could not remove."""
        return bool(self.unreadable or any(s.refused for s in self.snapshots))


def repair_snapshots(repo: Repository, dry_run: bool = False, forget: bool = False, read_data: bool = False,
                     progress: Callable[[CheckProgress], None] | None = None) -> SnapshotsRepair:
    """Write new snapshots without what is lost (see the module docstring); ``repo`` is locked by the caller,
    exclusively unless ``dry_run``, and its index is loaded here."""
    damage = find_damage(repo, read_data, progress)
    _refuse_without_sound_index(damage)
    old_index_files = list(repo.index_files)
    snaps, unreadable = repo.readable_snapshots()
    report = SnapshotsRepair(dry_run, unreadable=[exc.message for exc in unreadable],
                             damaged_packs=list(damage.result.damaged_packs))
    affected = {a.snapshot for a in damage.result.affected}
    done = {str(s.extra.get("repaired_from")): s for s in snaps if s.extra.get("repaired_from")}
    todo: list[SnapshotRepair] = []
    go: list[str] = []  # originals to forget: those repaired now, and those repaired before
    for snap in snaps:
        if snap.id not in affected:
            continue
        item = SnapshotRepair(snap)
        report.snapshots.append(item)
        if snap.tree is None:
            item.refused = IMAGE_REFUSED
        elif snap.id in done:
            item.repaired = done[snap.id]
            if not forget:
                item.refused = f"already repaired as {item.repaired.short_id}; --forget removes it"
        else:
            todo.append(item)
        if forget and not item.refused:
            go.append(snap.id)
    if dry_run:
        _rewrite_all(repo, damage.lost, todo, lambda data: repo.master.chunk_id(data))
        report.dropped_packs = list(damage.result.missing_packs)
        report.forgotten = go
        return report

    _never_deduplicate_against(repo, damage.lost)
    with BlobWriter(repo) as writer:
        _rewrite_all(repo, damage.lost, todo, lambda data: writer.store_blob(data, TREE))
    for item in todo:  # packs → index → snapshot: the writer has stored and indexed the new trees
        assert item.repaired is not None
        repo.save_snapshot(item.repaired)
    if damage.result.missing_packs:
        report.dropped_packs = _drop_missing_packs(repo, old_index_files, set(damage.result.missing_packs))
    for snapshot_id in go:
        repo.delete_snapshot(snapshot_id)
        report.forgotten.append(snapshot_id)
    return report


def _refuse_without_sound_index(damage: Damage) -> None:
    if damage.index_errors:
        raise HozonError(f"{damage.index_errors} index file(s) do not load, so the blobs they list would look lost",
                         hint="run hozon repair index first")
    if damage.unreferenced_packs and damage.result.affected:
        raise HozonError(f"{damage.unreferenced_packs} pack(s) are in no index and may hold what the snapshots miss",
                         hint="run hozon repair index first")


def _never_deduplicate_against(repo: Repository, lost: npt.NDArray[np.bool_]) -> None:
    """Treat the packs holding lost blobs as condemned in memory, so a new tree that happens to equal
    a lost one is stored again instead of referenced."""
    for number in np.unique(repo.index.pack[lost]).tolist():
        repo.index.condemned.setdefault(int(number), 1)


def _rewrite_all(repo: Repository, lost: npt.NDArray[np.bool_], todo: list[SnapshotRepair],
                 store: Callable[[bytes], bytes]) -> None:
    rewriter = _Rewriter(repo, lost, store)
    for item in todo:
        snap = item.original
        assert snap.tree is not None
        rewritten = rewriter.tree(snap.tree)
        if rewritten is None:
            root, item.changes = rewriter.empty_tree(), [Change("/", LOST_LISTING)]
        else:
            root, item.changes = rewritten
        item.repaired = dataclasses.replace(snap, id="", tree=root, tags=sorted({*snap.tags, REPAIRED_TAG}),
                                            extra={**snap.extra, "repaired_from": snap.id})


class _Rewriter:
    """Trees with what is lost left out, each original tree rewritten once for all snapshots."""

    def __init__(self, repo: Repository, lost: npt.NDArray[np.bool_], store: Callable[[bytes], bytes]) -> None:
        self.repo = repo
        self.lost = lost
        self.store = store
        self.done: dict[str, tuple[str, list[Change]] | None] = {}
        self._empty = ""

    def empty_tree(self) -> str:
        if not self._empty:
            self._empty = self.store(encode_tree([])).hex()
        return self._empty

    def tree(self, tree_id: str) -> tuple[str, list[Change]] | None:
        """The new id of a tree and what was taken out below it (paths relative to it), or None when
        its own listing is lost."""
        if tree_id in self.done:
            return self.done[tree_id]
        nodes = self._load(tree_id)
        result: tuple[str, list[Change]] | None = None
        if nodes is not None:
            changes: list[Change] = []
            kept: list[Node] = []
            changed = False
            for node, whole in zip(nodes, self._whole(nodes), strict=True):
                if not whole:
                    changes.append(Change(f"/{node.name}", LOST_CONTENT))
                    changed = True
                    continue
                if node.type == DIR and node.subtree:
                    below = self.tree(node.subtree)
                    new_id, moved = (self.empty_tree(), [Change("", LOST_LISTING)]) if below is None else below
                    changed = changed or new_id != node.subtree
                    node.subtree = new_id
                    changes += [Change(f"/{node.name}{c.path}", c.what) for c in moved]
                kept.append(node)
            result = (self.store(encode_tree(kept)).hex() if changed else tree_id, changes)
        self.done[tree_id] = result
        return result

    def _load(self, tree_id: str) -> list[Node] | None:
        try:
            ids = np.frombuffer(bytes.fromhex(tree_id), np.uint8).reshape(-1, 32)
        except ValueError:
            return None
        row = self.repo.index.positions(ids)
        if len(row) != 1 or row[0] < 0 or self.lost[row[0]]:
            return None
        try:
            return self.repo.load_tree(tree_id)
        except CorruptData:
            return None

    def _whole(self, nodes: list[Node]) -> list[bool]:
        """Whether every chunk of each node's content is there (nodes without content are whole)."""
        whole = [True] * len(nodes)
        spans: list[tuple[int, int, int]] = []  # node, its first id, the end of its ids
        raw: list[bytes] = []
        count = 0
        for i, node in enumerate(nodes):
            if not node.content:
                continue
            try:
                ids = bytes.fromhex("".join(node.content))
            except ValueError:
                ids = b""
            if len(ids) != 32 * len(node.content):
                whole[i] = False
                continue
            spans.append((i, count, count + len(node.content)))
            raw.append(ids)
            count += len(node.content)
        if not raw:
            return whole
        rows = self.repo.index.positions(np.frombuffer(b"".join(raw), np.uint8).reshape(-1, 32))
        good = rows >= 0
        good[good] = ~self.lost[rows[good]]
        for i, start, end in spans:
            whole[i] = bool(good[start:end].all())
        return whole


def _drop_missing_packs(repo: Repository, old_files: list[str], missing: set[str]) -> list[str]:
    """Write the index again without the packs that are gone, then delete the old files."""
    merged: dict[str, PackRecord] = {}
    for name in old_files:
        for record in repo.read_index_file(name):
            if record.name in missing:
                continue
            before = merged.get(record.name)
            if before is None:
                merged[record.name] = record
            elif before.condemned_at and (record.condemned_at == 0 or record.condemned_at > before.condemned_at):
                merged[record.name] = record  # a live listing wins; else the latest stamp
    out = IndexWriter(repo)
    for record in merged.values():
        out.add(record)
    out.flush()
    written = set(out.written)
    for name in old_files:
        if name not in written:
            repo.backend.delete(f"index/{name}")
    return sorted(missing)
