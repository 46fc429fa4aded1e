"""Prune: give back the space of blobs no snapshot needs, safely while backups run.

Prune is "plan, then execute": ``plan_prune`` only reads and returns a ``PrunePlan`` the command
prints (``--dry-run`` stops there); ``execute_prune`` carries it out. It runs under a ``prune`` lock,
which excludes other prunes and exclusive holders but not backups, so it must never delete a blob a
running backup may still reference. A backup references a blob only if the blob was live in the
index it loaded when it started (or it wrote the blob itself). Hence the grace rule:

    A condemned pack (index entry with ``condemned_at``) is deleted only when every live lock other
    than prune's own started after ``condemned_at``, and no snapshot appeared while prune ran.

For that to hold, ``condemned_at`` must be a time after which no one can load an index that shows
the pack live; so a pack is first dropped from the live index and only then stamped (step 5).

Plan (read only):
 1. List the snapshots, *then* load the index: everything a listed snapshot names was indexed before
    the snapshot was written, so a referenced blob missing from the index means damage, and prune
    stops before changing anything ("run hozon check").
 2. Walk every snapshot's trees (each tree once) and mark used rows in a bool mask aligned with the
    index rows (1 byte per blob). Image snapshots (``tree`` None) name map blobs of chunk ids (``repo/imagemap.py``).
 3. Per pack, with its used bytes: live and unused → condemn; live and used below the repack threshold
    → repack (copy the used sealed blobs as they are into new packs, then condemn the old pack);
    otherwise keep. Condemned earlier: any blob used → resurrect (live again); else delete when the
    grace rule allows, else leave condemned. Packs in ``data/`` but in no index (a killed backup's,
    or one a running backup has not indexed yet): read their headers; used → index live, else condemn.
    Listed but missing from ``data/``: unused → drop from the index; used → damage, stop.

Execute (every step leaves a repository that ``hozon check`` accepts if interrupted):
 1. Repack: write the new packs (unindexed packs are garbage for a later prune, never data loss).
 2. Re-list locks, then snapshots (in that order: a backup writes its snapshot before it releases
    its lock). A new snapshot means a backup finished with blobs prune did not count: delete nothing.
 3. Write new index files (≤ 50,000 packs each): live, resurrected, repacked, adopted-used packs, and
    packs condemned earlier that must wait (with their old times). Packs condemned earlier whose
    grace is over are left out (they are about to go).
 4. Delete the index files loaded in plan step 1 (only those: others may have added files since).
 5. Newly condemned packs are now in no index, so a backup starting from here cannot use them. Take
    T = now, re-list locks, snapshots and index files (the reverse of a backup's write order); if no
    other live lock started before T, no snapshot appeared and no index file written meanwhile names
    the pack (a backup that stopped without a snapshot), it is deleted in this run (the usual case:
    one prune reclaims the space). Otherwise it is indexed as condemned at T; a later prune deletes
    it once those backups have ended.
 6. Delete the packs allowed above, and temporary files older than a day (local directories).
A pack left out of every index by a crash between steps 4 and 6 is found by the next prune as
unindexed and condemned then (or taken back by the next backup, repo/recover.py), which only delays
its deletion. Backups take back unindexed packs only while no other lock is held, so never one that
prune is about to delete. Lock start times come from each holder's clock: hosts must agree on time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hozon.errors import CorruptData, HozonError, ObjectNotFound
from hozon.repo.backends.base import Retention
from hozon.repo.imagemap import decode_map, map_ids, mapped_entries, zero_mask
from hozon.repo.index import IndexFile, PackRecord
from hozon.repo.locks import LockInfo, list_locks
from hozon.repo.pack import PackBuilder, pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, this_host
from hozon.repo.writer import pack_record

PACKS_PER_INDEX_FILE = 50_000
BLOBS_PER_INDEX_FILE = 1_000_000
TMP_MAX_AGE = 24 * 3600
DEFAULT_REPACK_THRESHOLD = 0.8
_ID_BATCH = 65_536

Progress = Callable[[str], None]


def _damaged(what: str) -> HozonError:
    """The repository is already damaged: prune changes nothing until ``hozon check`` is clean."""
    return HozonError(f"prune stopped before changing anything: {what}", hint="run: hozon check --read-data")


@dataclass
class PackUse:
    """One pack as prune sees it."""

    name: str
    blobs: int
    size: int  # sealed bytes of its blobs
    used_blobs: int = 0
    used_bytes: int = 0
    condemned_at: int = 0  # 0: listed live


@dataclass
class PrunePlan:
    snapshot_ids: list[str]  # the snapshots whose trees made the used set
    index_files: list[str]  # the index files loaded; execute deletes exactly these
    packs: dict[str, PackUse]  # every indexed or adopted pack
    used: npt.NDArray[np.bool_]  # aligned with the index rows
    threshold: float
    keep: list[str] = field(default_factory=list)
    repack: list[str] = field(default_factory=list)
    condemn: list[str] = field(default_factory=list)  # live packs that no snapshot uses
    resurrect: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # condemned earlier, grace not over
    delete: list[str] = field(default_factory=list)  # condemned earlier, grace over
    adopt_live: list[PackRecord] = field(default_factory=list)  # in no index, some blob used
    adopt_condemned: list[PackRecord] = field(default_factory=list)  # in no index, unused
    unreadable: list[str] = field(default_factory=list)  # in no index, header unreadable: left alone
    missing: list[str] = field(default_factory=list)  # indexed, not in data/, unused: dropped
    locked: set[str] = field(default_factory=set)  # unused packs under a retention lock: stamped, not deleted
    stale_uploads: int = 0  # interrupted uploads older than TMP_MAX_AGE, removed by the backend
    blockers: list[LockInfo] = field(default_factory=list)  # other live locks when planning

    def size_of(self, names: Iterable[str]) -> int:
        return sum(self.packs[n].size for n in names)

    @property
    def copy_bytes(self) -> int:
        return sum(self.packs[n].used_bytes for n in self.repack)

    @property
    def newly_condemned(self) -> list[str]:
        """Packs that leave the live index in this run (stamped, or deleted, in execute step 5)."""
        return self.condemn + self.repack + [r.name for r in self.adopt_condemned]

    @property
    def changes_index(self) -> bool:
        return bool(self.repack or self.condemn or self.resurrect or self.delete or self.adopt_live
                    or self.adopt_condemned or self.missing)

    def summary(self) -> dict[str, object]:
        def part(names: list[str]) -> dict[str, int]:
            return {"packs": len(names), "bytes": self.size_of(names)}

        return {
            "snapshots": len(self.snapshot_ids), "index_files": len(self.index_files),
            "packs": len(self.packs), "bytes": self.size_of(self.packs),
            "keep": part(self.keep), "repack": {**part(self.repack), "copy_bytes": self.copy_bytes},
            "condemn": part(self.condemn), "resurrect": part(self.resurrect), "waiting": part(self.waiting),
            "delete": part(self.delete),
            "unindexed": {"indexed_live": len(self.adopt_live), "condemned": len(self.adopt_condemned),
                          "unreadable": len(self.unreadable)},
            "missing_dropped": len(self.missing), "tmp_files": self.stale_uploads,
            "repack_threshold": self.threshold,
            "blockers": [lk.describe() for lk in self.blockers],
        }


@dataclass
class PruneResult:
    packs_written: int = 0
    bytes_copied: int = 0
    index_written: int = 0
    index_deleted: int = 0
    packs_deleted: int = 0
    bytes_freed: int = 0
    condemned_kept: int = 0  # condemned packs still on disk, waiting for a later prune
    held_by: list[str] = field(default_factory=list)  # why they wait (locks, or a new snapshot)
    tmp_deleted: int = 0

    def summary(self) -> dict[str, object]:
        return dict(self.__dict__)


# -- the grace rule -------------------------------------------------------------------------------
def grace_over(condemned_at: float, others: Iterable[LockInfo]) -> bool:
    """Whether a pack condemned at ``condemned_at`` may go: every other live lock started later."""
    return all(lock.started > condemned_at for lock in others)


def other_live_locks(repo: Repository) -> list[LockInfo]:
    """Live locks not held by this process (forget --prune holds one lock for both steps)."""
    me = (this_host(), os.getpid())
    return [lk for lk in list_locks(repo) if not lk.stale and (lk.hostname, lk.pid) != me]


# -- plan -----------------------------------------------------------------------------------------
def plan_prune(
    repo: Repository,
    threshold: float = DEFAULT_REPACK_THRESHOLD,
    ignore_snapshots: Iterable[str] = (),
    progress: Progress | None = None,
) -> PrunePlan:
    """Read the repository and decide; writes nothing. ``ignore_snapshots`` are counted as gone."""
    say = progress or (lambda _msg: None)
    ignored = set(ignore_snapshots)
    snapshot_ids = [i for i in repo.snapshot_ids() if i not in ignored]
    say("loading the index")
    index_files, listed = _load_index(repo)  # after the snapshot listing: see plan step 1
    index = repo.index
    say(f"finding the blobs {len(snapshot_ids)} snapshot(s) use")
    used = _used_rows(repo, (_load_snapshot(repo, i) for i in snapshot_ids))

    numbers = np.asarray(index.pack[used], dtype=np.int64)
    used_blobs = np.bincount(numbers, minlength=len(index.packs))
    used_bytes = np.bincount(numbers, weights=index.length[used].astype(np.float64), minlength=len(index.packs))
    present = set(repo.list_packs())
    blockers = other_live_locks(repo)
    plan = PrunePlan(snapshot_ids, index_files, {}, used, threshold, blockers=blockers)
    locked = _pack_locks(repo)
    for number, name in enumerate(index.packs):
        blobs, size = listed.get(name, (0, 0))
        use = PackUse(name, blobs, size, int(used_blobs[number]), int(used_bytes[number]),
                      index.condemned.get(number, 0))
        plan.packs[name] = use
        if name not in present:
            if use.used_blobs:
                raise _damaged(f"pack {name[:16]} holds {use.used_blobs} blob(s) in use but is missing")
            plan.missing.append(name)
        elif use.condemned_at:
            if use.used_blobs:
                plan.resurrect.append(name)
            elif grace_over(use.condemned_at, blockers) and not locked(name):
                plan.delete.append(name)
            else:
                plan.waiting.append(name)
        elif not use.used_blobs:
            plan.condemn.append(name)
            if locked(name):
                plan.locked.add(name)
        elif use.size and use.used_bytes / use.size < threshold and not locked(name):
            plan.repack.append(name)
        else:
            plan.keep.append(name)

    unindexed = sorted(present - set(index.packs))
    if unindexed:
        say(f"reading the headers of {len(unindexed)} unindexed pack(s)")
    for name in unindexed:
        try:
            _data, entries = repo.read_pack(name)
        except (CorruptData, ObjectNotFound):
            plan.unreadable.append(name)  # half-uploaded or damaged: hozon check reports it
            continue
        record = pack_record(name, entries)
        rows = index.positions(_id_matrix(e.blob_id for e in entries))
        in_use = bool(np.any(used[rows[rows >= 0]]))
        plan.packs[name] = PackUse(name, len(entries), sum(e.length for e in entries),
                                   used_blobs=int(np.count_nonzero(used[rows[rows >= 0]])))
        (plan.adopt_live if in_use else plan.adopt_condemned).append(record)
        if not in_use and locked(name):
            plan.locked.add(name)

    plan.stale_uploads = repo.backend.clean_uploads(TMP_MAX_AGE, dry_run=True)
    return plan


def _pack_locks(repo: Repository) -> Callable[[str], bool]:
    """Whether a pack is under a retention lock (S3 Object Lock): then it is neither repacked nor
    deleted, as the storage would refuse; it waits, condemned, until a prune after its date."""
    backend = repo.backend
    if not isinstance(backend, Retention):
        return lambda _name: False
    return lambda name: backend.locked_until(pack_key(name)) is not None


def _load_index(repo: Repository) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Load the index into ``repo.index``; also give the loaded file names and blobs/bytes per pack."""
    names = sorted(e.key.rsplit("/", 1)[-1] for e in repo.backend.list("index"))
    listed: dict[str, tuple[int, int]] = {}

    def files() -> Iterator[IndexFile]:
        for name in names:
            f = repo.decode_index_file(name)
            ends = np.cumsum(f.counts)
            sums = np.concatenate([[0], np.cumsum(f.entries["length"], dtype=np.int64)])
            sizes = sums[ends] - sums[ends - f.counts]
            for pack, count, size in zip(f.names, f.counts.tolist(), sizes.tolist(), strict=True):
                old = listed.get(pack, (0, 0))
                listed[pack] = (max(old[0], count), max(old[1], size))
            yield f

    repo.index.load(files())
    repo.index_files = list(names)
    return names, listed


def _load_snapshot(repo: Repository, snapshot_id: str) -> Snapshot:
    try:
        return repo.load_snapshot(snapshot_id)
    except CorruptData as exc:  # what it uses is unknown: nothing may be deleted
        raise _damaged(exc.message) from exc


def _id_matrix(ids: Iterable[bytes]) -> npt.NDArray[np.uint8]:
    return np.frombuffer(b"".join(ids), np.uint8).reshape(-1, 32)


def _used_rows(repo: Repository, snapshots: Iterable[Snapshot]) -> npt.NDArray[np.bool_]:
    """A mask over the index rows: the blobs some snapshot needs (trees and contents)."""
    index = repo.index
    used = np.zeros(len(index.hi), bool)
    walked = np.zeros(len(index.hi), bool)  # trees walked (a data chunk may share a tree's id)

    def mark(snap: Snapshot, ids: list[bytes]) -> None:
        if not ids:
            return
        rows = index.positions(_id_matrix(ids))
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise _damaged(f"snapshot {snap.short_id} references {len(missing)} blob(s) that are in no "
                               f"index (e.g. {ids[int(missing[0])].hex()[:16]})")
        used[rows] = True
        ids.clear()

    for snap in snapshots:
        pending: list[bytes] = []
        if snap.tree is None:  # disk images: map blobs and the chunks they name
            for what, disk in mapped_entries(snap.extra):
                maps = map_ids(disk)
                mark(snap, list(maps))
                for map_id in maps:
                    try:
                        ids = decode_map(repo.load_blob(map_id), f"map blob {map_id.hex()[:16]}")
                    except CorruptData as exc:
                        raise _damaged(f"snapshot {snap.short_id}: {exc.message}") from exc
                    live = ids[~zero_mask(ids)]
                    rows = index.positions(live)
                    if (rows < 0).any():
                        raise _damaged(f"snapshot {snap.short_id} references chunks of {what} that are in no "
                                       "index")
                    used[rows] = True
            continue
        stack = [snap.tree]
        while stack:
            tree_id = stack.pop()
            row = int(index.positions(_id_matrix([bytes.fromhex(tree_id)]))[0])
            if row < 0:
                raise _damaged(f"snapshot {snap.short_id} references tree {tree_id[:16]}, which is in no index")
            if walked[row]:
                continue
            walked[row] = used[row] = True
            try:
                nodes = repo.load_tree(tree_id)
            except CorruptData as exc:
                raise _damaged(f"snapshot {snap.short_id}: {exc.message}") from exc
            for node in nodes:
                pending.extend(bytes.fromhex(c) for c in node.content)
                if node.subtree:
                    stack.append(node.subtree)
            if len(pending) >= _ID_BATCH:
                mark(snap, pending)
        mark(snap, pending)
    return used


# -- execute --------------------------------------------------------------------------------------
class IndexWriter:
    """Writes pack records into index files of bounded size (prune and repair replace the index with it)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.records: list[PackRecord] = []
        self.blobs = 0
        self.written: list[str] = []

    def add(self, record: PackRecord) -> None:
        self.records.append(record)
        self.blobs += len(record.entries)
        if len(self.records) >= PACKS_PER_INDEX_FILE or self.blobs >= BLOBS_PER_INDEX_FILE:
            self.flush()

    def flush(self) -> None:
        if self.records:
            self.written.append(self.repo.write_index(self.records))
        self.records, self.blobs = [], 0


def execute_prune(repo: Repository, plan: PrunePlan, progress: Progress | None = None) -> PruneResult:
    """Carry out a plan made by ``plan_prune`` on the same open repository, under the same lock."""
    say = progress or (lambda _msg: None)
    result = PruneResult()
    kept_stamps = [plan.packs[n].condemned_at for n in plan.waiting]  # condemned packs that stay
    delete: list[str] = []
    blockers = other_live_locks(repo)
    appeared = _new_snapshots(repo, plan)
    if plan.changes_index:
        if plan.repack:
            say(f"repacking {len(plan.repack)} pack(s)")
        repacked = _repack(repo, plan, result)

        # Step 2: which packs condemned earlier may go (locks first, then snapshots).
        blockers = other_live_locks(repo)
        appeared = _new_snapshots(repo, plan)
        if not appeared:
            delete = [n for n in plan.delete if grace_over(plan.packs[n].condemned_at, blockers)]
        going = set(delete)

        # Step 3: the new index, without newly condemned packs and without those about to go.
        say("writing the new index")
        out = IndexWriter(repo)
        live = set(plan.keep) | set(plan.resurrect)
        still_condemned = set(plan.waiting) | (set(plan.delete) - going)
        stamped_later = set(plan.condemn) | set(plan.repack)
        later: list[PackRecord] = []
        done: set[str] = set()
        for record in _old_records(repo, plan.index_files):
            name = record.name
            if name in done:
                continue
            done.add(name)
            if name in live:
                out.add(PackRecord(name, record.entries))
            elif name in still_condemned:
                out.add(PackRecord(name, record.entries, plan.packs[name].condemned_at))
            elif name in stamped_later:
                later.append(PackRecord(name, record.entries))
        for record in repacked + plan.adopt_live:
            out.add(record)
        out.flush()
        kept_stamps += [plan.packs[n].condemned_at for n in set(plan.delete) - going]

        # Step 4: the old index files, exactly those loaded when planning.
        for name in plan.index_files:
            repo.backend.delete(f"index/{name}")
        result.index_deleted = len(plan.index_files)

        # Step 5: no index shows the newly condemned packs live any more; stamp them now. Locks,
        # then snapshots, then index files: a backup writes them in the reverse order.
        stamp = math.ceil(time.time())
        later += plan.adopt_condemned
        blockers = other_live_locks(repo)
        appeared = _new_snapshots(repo, plan)
        listed = _listed_by_others(repo, set(plan.index_files) | set(out.written))
        protected = listed if listed is not None else set(plan.packs)
        reclaim = not appeared and grace_over(stamp, blockers)
        for record in later:
            if reclaim and record.name not in protected and record.name not in plan.locked:
                delete.append(record.name)
            else:
                out.add(PackRecord(record.name, record.entries, stamp))
                kept_stamps.append(stamp)
        out.flush()
        result.index_written = len(out.written)
        # Re-check the packs condemned earlier with the latest listings (a lock may show up late,
        # from a host whose clock runs behind). One kept here is in no index of ours now: the next
        # prune finds it unindexed and condemns it again.
        for name in list(delete):
            condemned_at = plan.packs[name].condemned_at or stamp
            if appeared or name in protected or not grace_over(condemned_at, blockers):
                delete.remove(name)
                kept_stamps.append(condemned_at)
        if protected & set(plan.newly_condemned + plan.delete):
            result.held_by.append("an index file written while prune ran lists some of them")

    # Step 6: the packs, then old temporary files.
    if delete:
        say(f"deleting {len(delete)} pack(s)")
    for name in delete:
        repo.backend.delete(pack_key(name))
        result.packs_deleted += 1
        result.bytes_freed += plan.packs[name].size
    if plan.stale_uploads:
        result.tmp_deleted = repo.backend.clean_uploads(TMP_MAX_AGE)

    result.condemned_kept = len(kept_stamps)
    if kept_stamps:
        if appeared:
            result.held_by.append(f"{len(appeared)} snapshot(s) were saved while prune ran")
        newest = max(kept_stamps)
        result.held_by += [lk.describe() for lk in blockers if lk.started <= newest]
    return result


def _new_snapshots(repo: Repository, plan: PrunePlan) -> set[str]:
    return set(repo.snapshot_ids()) - set(plan.snapshot_ids)


def _listed_by_others(repo: Repository, known: set[str]) -> set[str] | None:
    """Packs named by index files that appeared while prune ran (a backup that stopped without a
    snapshot may have indexed packs that looked unindexed when planning): those are never deleted.
    None when such a file cannot be read: then nothing may be deleted."""
    names: set[str] = set()
    for key, _size in repo.backend.list("index"):
        name = key.rsplit("/", 1)[-1]
        if name not in known:
            try:
                names.update(repo.decode_index_file(name).names)
            except CorruptData:
                return None
    return names


def _old_records(repo: Repository, names: list[str]) -> Iterator[PackRecord]:
    for name in names:
        yield from repo.read_index_file(name)


def _repack(repo: Repository, plan: PrunePlan, result: PruneResult) -> list[PackRecord]:
    """Copy the used sealed blobs of the packs to repack into new packs; returns their records."""
    index = repo.index
    records: list[PackRecord] = []
    builder = PackBuilder(repo.cipher)

    def store() -> None:
        nonlocal builder
        name, data = builder.finish()
        repo.backend.put(pack_key(name), data)
        records.append(pack_record(name, builder.entries))
        result.packs_written += 1
        builder = PackBuilder(repo.cipher)

    for name in plan.repack:
        number = index.pack_number(name)
        try:
            data, entries = repo.read_pack(name)
        except CorruptData as exc:
            raise _damaged(exc.message) from exc
        rows = index.positions(_id_matrix(e.blob_id for e in entries))
        copied = 0
        for entry, row in zip(entries, rows, strict=True):
            if row < 0 or not plan.used[row] or int(index.pack[row]) != number:
                continue  # unused, or its live copy is in another pack
            sealed = data[entry.offset : entry.offset + entry.length]
            try:
                repo.open_blob(pack_key(name), sealed, entry.blob_type, entry.blob_id)  # never copy damage
            except CorruptData as exc:
                raise _damaged(exc.message) from exc
            builder.add(entry.blob_type, entry.blob_id, sealed, entry.raw_length)
            copied += 1
            result.bytes_copied += len(sealed)
            if builder.full():
                store()
        if copied != plan.packs[name].used_blobs:
            raise _damaged(f"pack {name[:16]} holds {copied} of the {plan.packs[name].used_blobs} "
                               "used blobs its index entry lists")
    if builder.entries:
        store()
    return records
