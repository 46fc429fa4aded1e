"""Checking a repository: is everything a snapshot names really there, and (with read_data) intact?

    index files   every one loads and authenticates
    packs         every pack the index names exists; packs no index names are garbage (a note)
    snapshots     every snapshot file loads; its trees load; every blob they name is in the index
    read_data     every referenced pack is read whole: hash = name, header authenticates and
                  agrees with the index, every blob decrypts and matches its id (2 threads);
                  a ``DataSubset`` reads only some of the packs (a rotating part each night)

Damage is traced to what it costs: each bad blob is mapped to the snapshots and paths that use it
(a bad tree blob costs its whole directory, so the directory is reported). Memory stays flat at
millions of blobs: per-blob state lives in numpy arrays parallel to the in-memory index, and a
subtree found clean once is not walked again for later snapshots.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hozon.crypto import content_name
from hozon.errors import CorruptData, HozonError, ObjectNotFound, UsageError
from hozon.repo.imagemap import decode_map, map_ids, mapped_entries, zero_mask
from hozon.repo.index import IndexFile
from hozon.repo.pack import pack_key, read_header
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import DIR, Node, decode_tree

READ_THREADS = 2
PACKS_IN_FLIGHT = 4  # packs being verified or queued: bounds memory to a few packs
MAX_PATHS = 10_000  # paths kept per affected snapshot; the rest are only counted
SHOWN_PATHS = 5  # paths named per snapshot in an error sentence
SHOWN_SNAPSHOTS = 5
SHOWN_BLOB_PROBLEMS = 5
CHUNK_BATCH = 1 << 16

_NOT_INDEXED = -1  # cause of damage: a blob no index lists
_UNPARSABLE = -2  # cause of damage: a tree blob that authenticates but does not parse


@dataclass(frozen=True)
class CheckProgress:
    phase: str  # "index", "packs", "read-data", "snapshots"
    done: int
    total: int
    bytes_done: int = 0


@dataclass(frozen=True)
class DataSubset:
    """Which packs ``--read-data-subset`` reads: group ``part`` of ``parts`` (``2/7``: the packs whose
    name, as a number, leaves 1 divided by 7, the same packs every time, so seven nights with
    ``1/7`` … ``7/7`` read everything once), or a random ``percent`` of them."""

    part: int = 0
    parts: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> DataSubset:
        if m := re.fullmatch(r"(\d+)/(\d+)", text.strip()):
            part, parts = int(m[1]), int(m[2])
            if not 1 <= part <= parts:
                raise UsageError(f"--read-data-subset {text}: N/M needs 1 <= N <= M")
            return cls(part=part, parts=parts)
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text.strip()):
            percent = float(m[1])
            if not 0 < percent <= 100:
                raise UsageError(f"--read-data-subset {text}: a percentage must be above 0 and at most 100")
            return cls(percent=percent)
        raise UsageError(f"--read-data-subset {text!r} is neither N/M nor N%", hint="for example 1/7 or 10%")

    def choose(self, names: list[str]) -> list[int]:
        """The positions in ``names`` (pack names) to read."""
        if self.parts:
            return [i for i, name in enumerate(names) if int(name[:16], 16) % self.parts == self.part - 1]
        count = min(len(names), max(1, round(len(names) * self.percent / 100))) if names else 0
        return sorted(random.sample(range(len(names)), count))

    def describe(self) -> str:
        return f"{self.part}/{self.parts}" if self.parts else f"{self.percent:g}%"


@dataclass(frozen=True)
class Affected:
    snapshot: str  # full id
    paths: tuple[str, ...]  # files and directories that cannot be restored whole
    more: int = 0  # further affected paths, counted but not listed


@dataclass(frozen=True)
class CheckResult:
    errors: tuple[str, ...]
    notes: tuple[str, ...]
    damaged_packs: tuple[str, ...]  # names of packs that exist but fail their checks
    missing_packs: tuple[str, ...]  # names of packs the index names that are not in data/
    affected: tuple[Affected, ...]
    index_files: int
    packs: int
    snapshots: int
    packs_read: int
    bytes_read: int

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class _PackVerdict:
    """What reading one pack found (made on a worker thread)."""

    name: str
    number: int
    size: int
    problems: tuple[str, ...]
    bad_rows: tuple[int, ...]  # index rows in this pack whose blob cannot be read
    whole: bool  # the header is unreadable: every blob the index places here is lost
    unlisted: bool  # the index places blobs here that the header does not list
    listed_rows: tuple[int, ...] = ()  # rows the header does list (only when ``unlisted``)


@dataclass
class _Frame:
    row: int
    path: str  # the directory's path; "" for the root
    nodes: list[Node]
    next: int = 0
    clean: bool = True


@dataclass
class _Damage:
    """Affected paths of one snapshot, overall and per cause (a pack number or a negative code)."""

    paths: dict[str, None] = field(default_factory=dict)  # ordered set
    more: int = 0
    by_cause: dict[int, list[str]] = field(default_factory=dict)
    more_by_cause: dict[int, int] = field(default_factory=dict)


def check_repository(
    repo: Repository, read_data: bool = False, progress: Callable[[CheckProgress], None] | None = None,
    subset: DataSubset | None = None,
) -> CheckResult:
    """Check ``repo`` (which should be locked, shared, by the caller); never raises for damage found.

    With ``read_data``, ``subset`` limits the packs read (all of them when None)."""
    return _Check(repo, progress).run(read_data, subset)


@dataclass(frozen=True, eq=False)
class Damage:
    """A check's result and which blobs it found lost, for ``hozon repair snapshots``."""

    result: CheckResult
    lost: npt.NDArray[np.bool_]  # per row of repo.index: its pack is missing, or (read_data) it fails its checks
    index_errors: int  # index files that do not load: the blobs only they list look lost
    unreferenced_packs: int  # packs in data/ that no loaded index file names


def find_damage(
    repo: Repository, read_data: bool = False, progress: Callable[[CheckProgress], None] | None = None
) -> Damage:
    """:func:`check_repository`, keeping what it learnt about every blob."""
    check = _Check(repo, progress)
    result = check.run(read_data, None)
    return Damage(result, check.bad_row, check.index_errors, check.unreferenced)


def _what(exc: CorruptData) -> str:
    """The part of a CorruptData message after '… is damaged: '."""
    return exc.message.split(" is damaged: ", 1)[-1]


def _ids(hex_ids: list[str]) -> npt.NDArray[np.uint8]:
    return np.frombuffer(bytes.fromhex("".join(hex_ids)), np.uint8).reshape(-1, 32)


class _Check:
    def __init__(self, repo: Repository, progress: Callable[[CheckProgress], None] | None) -> None:
        self.repo = repo
        self.index = repo.index
        self.progress = progress or (lambda _p: None)
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.index_errors = 0
        self.pack_problems: dict[int, list[str]] = {}  # pack number → what is wrong with it
        self.missing: list[int] = []
        self.bad_row = np.zeros(0, bool)
        self.tree_clean = np.zeros(0, bool)
        self.damage: dict[str, _Damage] = {}
        self.snapshot_errors: dict[str, list[str]] = {}
        self.packs_read = 0
        self.bytes_read = 0
        self.unreferenced = 0  # packs in data/ that no loaded index file names

    # -- the phases -----------------------------------------------------------------------------
    def run(self, read_data: bool, subset: DataSubset | None) -> CheckResult:
        index_files = self._load_index()
        self.bad_row = np.zeros(len(self.index.hi), bool)
        self.tree_clean = np.zeros(len(self.index.hi), bool)
        present = self._list_packs()
        if read_data:
            numbers = [n for n, here in enumerate(present) if here]
            if subset is not None:
                numbers = [numbers[i] for i in subset.choose([self.index.packs[n] for n in numbers])]
            self._read_packs(numbers)
        snapshots = self._load_snapshots()
        for done, snap in enumerate(snapshots):
            self.progress(CheckProgress("snapshots", done, len(snapshots)))
            self._check_snapshot(snap)
        self.progress(CheckProgress("snapshots", len(snapshots), len(snapshots)))
        return self._result(index_files, len(present), snapshots)

    def _load_index(self) -> int:
        names = sorted(e.key.rsplit("/", 1)[-1] for e in self.repo.backend.list("index"))

        def good_files() -> Iterator[IndexFile]:
            for done, name in enumerate(names):
                self.progress(CheckProgress("index", done, len(names)))
                try:
                    yield self.repo.decode_index_file(name)
                except CorruptData as exc:
                    self.index_errors += 1
                    self.errors.append(exc.message)

        self.index.load(good_files())
        self.repo.index_files = names
        return len(names)

    def _list_packs(self) -> list[bool]:
        """Which index-named packs are in data/ (by pack number); notes the unreferenced ones."""
        number = {name: n for n, name in enumerate(self.index.packs)}
        present = [False] * len(self.index.packs)
        unreferenced = 0
        for seen, name in enumerate(self.repo.list_packs()):
            if seen % 1000 == 0:
                self.progress(CheckProgress("packs", seen, 0))
            n = number.get(name)
            if n is None:
                unreferenced += 1
            else:
                present[n] = True
        self.unreferenced = unreferenced
        self.missing = [n for n, here in enumerate(present) if not here]
        for n in self.missing:
            self._mark_pack_lost(n)
        if unreferenced:
            why = "left by an interrupted backup"
            if self.index_errors:
                why += " or named only by a damaged index file"
            self.notes.append(f"{unreferenced} unreferenced pack(s), {why}; `hozon prune` removes them")
        return present

    def _load_snapshots(self) -> list[Snapshot]:
        snapshots: list[Snapshot] = []
        for snapshot_id in self.repo.snapshot_ids():
            try:
                snapshots.append(self.repo.load_snapshot(snapshot_id))
            except CorruptData as exc:
                self.errors.append(exc.message)
            except (ValueError, TypeError, KeyError) as exc:
                self.errors.append(f"repository file snapshots/{snapshot_id} is damaged: it does not parse ({exc})")
        return sorted(snapshots, key=_snapshot_time)

    # -- reading packs --------------------------------------------------------------------------
    def _read_packs(self, numbers: list[int]) -> None:
        expected = np.bincount(self.index.pack, minlength=len(self.index.packs))
        in_flight: deque[Future[_PackVerdict]] = deque()
        done = 0
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="hozon-check") as pool:
            try:
                for n in numbers:
                    in_flight.append(pool.submit(self._verify_pack, n, int(expected[n])))
                    if len(in_flight) >= PACKS_IN_FLIGHT:
                        self._take(in_flight.popleft().result())
                        done += 1
                        self.progress(CheckProgress("read-data", done, len(numbers), self.bytes_read))
                while in_flight:
                    self._take(in_flight.popleft().result())
                    done += 1
                    self.progress(CheckProgress("read-data", done, len(numbers), self.bytes_read))
            except BaseException:
                for f in in_flight:
                    f.cancel()
                raise

    def _verify_pack(self, number: int, expected: int) -> _PackVerdict:
        """Runs on a worker thread: reads only shared state, returns what it found."""
        name = self.index.packs[number]
        key = pack_key(name)
        try:
            data = self.repo.backend.get(key)
        except ObjectNotFound:
            return _PackVerdict(name, number, 0, ("the pack is missing",), (), True, False)
        except HozonError as exc:
            return _PackVerdict(name, number, 0, (f"it cannot be read ({exc.message})",), (), True, False)
        problems: list[str] = []
        if content_name(data) != name:
            problems.append("its content does not match its name (BLAKE3)")
        try:
            entries = read_header(self.repo.cipher, key, data, len(data))
        except CorruptData as exc:
            return _PackVerdict(name, number, len(data), (*problems, _what(exc)), (), True, False)

        bad_rows: list[int] = []
        rows = self.index.positions(_ids([e.blob_id.hex() for e in entries]))
        here = np.zeros(len(entries), bool)
        found = rows >= 0
        here[found] = self.index.pack[rows[found]] == number
        if (~found).any():
            problems.append(f"its header lists {int((~found).sum())} blob(s) that no index names")
        disagree = 0
        for j in np.flatnonzero(here).tolist():
            e, r = entries[j], int(rows[j])
            if (int(self.index.offset[r]), int(self.index.length[r]), int(self.index.type[r])) != (
                e.offset, e.length, e.blob_type
            ):
                disagree += 1
                bad_rows.append(r)
        if disagree:
            problems.append(f"its header and the index disagree about where {disagree} blob(s) lie")
        listed = np.unique(rows[here])
        unlisted = len(listed) < expected
        if unlisted:
            problems.append(f"the index names {expected - len(listed)} blob(s) in it that its header does not list")

        view = memoryview(data)
        blob_problems: list[str] = []
        for i, e in enumerate(entries):
            try:
                self.repo.open_blob(key, view[e.offset : e.offset + e.length], e.blob_type, e.blob_id)
            except CorruptData as exc:
                blob_problems.append(_what(exc))
                if here[i]:
                    bad_rows.append(int(rows[i]))
        if len(blob_problems) > SHOWN_BLOB_PROBLEMS:
            extra = len(blob_problems) - SHOWN_BLOB_PROBLEMS
            blob_problems[SHOWN_BLOB_PROBLEMS:] = [f"{extra} more blob(s) fail their checks"]
        problems += blob_problems
        return _PackVerdict(
            name, number, len(data), tuple(problems), tuple(bad_rows), False, unlisted,
            tuple(int(r) for r in listed) if unlisted else (),
        )

    def _take(self, verdict: _PackVerdict) -> None:
        self.packs_read += 1
        self.bytes_read += verdict.size
        if not verdict.problems:
            return
        self.pack_problems.setdefault(verdict.number, []).extend(verdict.problems)
        if verdict.whole:
            self._mark_pack_lost(verdict.number)
            return
        if verdict.bad_rows:
            self.bad_row[np.array(verdict.bad_rows, np.int64)] = True
        if verdict.unlisted:
            rows = np.flatnonzero(self.index.pack == verdict.number)
            self.bad_row[np.setdiff1d(rows, np.array(verdict.listed_rows, np.int64))] = True

    def _mark_pack_lost(self, number: int) -> None:
        self.bad_row[self.index.pack == number] = True

    # -- walking snapshots ----------------------------------------------------------------------
    def _check_snapshot(self, snap: Snapshot) -> None:
        if snap.tree is None:
            self._check_image(snap)
            return
        first = self._open_tree(snap, snap.tree, "")
        if not isinstance(first, _Frame):
            return
        stack = [first]
        while stack:
            frame = stack[-1]
            if frame.next == len(frame.nodes):
                stack.pop()
                if frame.clean:
                    self.tree_clean[frame.row] = True  # later snapshots skip this subtree
                elif stack:
                    stack[-1].clean = False
                continue
            node = frame.nodes[frame.next]
            frame.next += 1
            path = f"{frame.path}/{node.name}"
            if node.content and not self._content_ok(snap, path, node.content):
                frame.clean = False
            if node.type == DIR and node.subtree:
                child = self._open_tree(snap, node.subtree, path)
                if isinstance(child, _Frame):
                    stack.append(child)
                elif not child:
                    frame.clean = False

    def _open_tree(self, snap: Snapshot, tree_id: str, path: str) -> _Frame | bool:
        """A frame to walk the tree at ``path``, or True (known clean) / False (lost, recorded)."""
        shown = path or "/"
        try:
            blob_id = bytes.fromhex(tree_id)
        except ValueError:
            self._snapshot_error(snap, f"the directory {shown} names an invalid tree id")
            self._affect(snap, shown, _UNPARSABLE)
            return False
        row = int(self.index.positions(_ids([tree_id]))[0]) if len(blob_id) == 32 else -1
        if row < 0:
            self._affect(snap, shown, _NOT_INDEXED)
            return False
        if self.tree_clean[row]:
            return True
        if self.bad_row[row]:
            self._affect(snap, shown, int(self.index.pack[row]))
            return False
        try:
            nodes = decode_tree(self.repo.load_blob(blob_id))
        except CorruptData as exc:
            number = int(self.index.pack[row])
            self.pack_problems.setdefault(number, []).append(_what(exc))
            self.bad_row[row] = True
            self._affect(snap, shown, number)
            return False
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._snapshot_error(snap, f"the tree of {shown} does not parse ({exc})")
            self._affect(snap, shown, _UNPARSABLE)
            return False
        return _Frame(row, path, nodes)

    def _content_ok(self, snap: Snapshot, path: str, content: list[str]) -> bool:
        try:
            ids = _ids(content)
        except ValueError:
            self._snapshot_error(snap, f"{path} names an invalid chunk id")
            self._affect(snap, path, _UNPARSABLE)
            return False
        return self._ids_ok(snap, path, ids)

    def _ids_ok(self, snap: Snapshot, path: str, ids: npt.NDArray[np.uint8]) -> bool:
        rows = self.index.positions(ids)
        missing = rows < 0
        bad = missing.copy()
        bad[~missing] = self.bad_row[rows[~missing]]
        if not bad.any():
            return True
        if missing.any():
            self._affect(snap, path, _NOT_INDEXED)
        for number in np.unique(self.index.pack[rows[bad & ~missing]]):
            self._affect(snap, path, int(number))
        return False

    def _check_image(self, snap: Snapshot) -> None:
        """Disk images and a checkpoint's state: every map blob, and every non-zero chunk each map names."""
        for path, disk in mapped_entries(snap.extra):
            try:
                maps = map_ids(disk)
            except (ValueError, TypeError):
                self._snapshot_error(snap, f"{path} has a malformed list of map blobs")
                self._affect(snap, path, _UNPARSABLE)
                continue
            if not maps or not self._ids_ok(snap, path, np.frombuffer(b"".join(maps), np.uint8).reshape(-1, 32)):
                if not maps:
                    self._snapshot_error(snap, f"{path} lists no map blob")
                continue
            for map_id in maps:
                try:
                    ids = decode_map(self.repo.load_blob(map_id), f"map blob {map_id.hex()[:16]}")
                except CorruptData as exc:
                    self._snapshot_error(snap, f"{path}: {exc.message}")
                    continue
                live = ids[~zero_mask(ids)]
                for start in range(0, len(live), CHUNK_BATCH):
                    self._ids_ok(snap, path, live[start : start + CHUNK_BATCH])

    def _affect(self, snap: Snapshot, path: str, cause: int) -> None:
        d = self.damage.setdefault(snap.id, _Damage())
        if path not in d.paths:
            if len(d.paths) < MAX_PATHS:
                d.paths[path] = None
            else:
                d.more += 1
        listed = d.by_cause.setdefault(cause, [])
        if path in listed[-1:]:
            return
        if len(listed) < MAX_PATHS:
            listed.append(path)
        else:
            d.more_by_cause[cause] = d.more_by_cause.get(cause, 0) + 1

    def _snapshot_error(self, snap: Snapshot, what: str) -> None:
        self.snapshot_errors.setdefault(snap.id, []).append(what)

    # -- the result -----------------------------------------------------------------------------
    def _affects(self, cause: int, snapshots: list[Snapshot]) -> str:
        parts: list[str] = []
        hit = [s for s in snapshots if cause in self.damage.get(s.id, _Damage()).by_cause]
        for snap in hit[:SHOWN_SNAPSHOTS]:
            d = self.damage[snap.id]
            paths = d.by_cause[cause]
            more = len(paths) - SHOWN_PATHS + d.more_by_cause.get(cause, 0)
            text = ", ".join(paths[:SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")
            parts.append(f"snapshot {snap.short_id}: {text}")
        if len(hit) > SHOWN_SNAPSHOTS:
            parts.append(f"and {len(hit) - SHOWN_SNAPSHOTS} more snapshot(s)")
        return "affects " + "; ".join(parts) if parts else "affects no snapshot"

    def _result(self, index_files: int, packs: int, snapshots: list[Snapshot]) -> CheckResult:
        missing = set(self.missing)
        sources = self._index_files_naming(missing) if missing else {}
        for n in self.missing:
            name = self.index.packs[n]
            named_by = f" (named by index/{sources[n]})" if n in sources else ""
            self.errors.append(f"pack {pack_key(name)} is missing{named_by}; {self._affects(n, snapshots)}")
        damaged = [n for n in self.pack_problems if n not in missing]
        for n in damaged:
            problems = "; ".join(dict.fromkeys(self.pack_problems[n]))
            self.errors.append(f"pack {pack_key(self.index.packs[n])} is damaged: {problems}; "
                               f"{self._affects(n, snapshots)}")
        for snap in snapshots:
            for what in self.snapshot_errors.get(snap.id, []):
                self.errors.append(f"snapshot {snap.short_id}: {what}")
            d = self.damage.get(snap.id)
            if d is not None and _NOT_INDEXED in d.by_cause:
                paths = d.by_cause[_NOT_INDEXED]
                more = len(paths) - SHOWN_PATHS + d.more_by_cause.get(_NOT_INDEXED, 0)
                text = ", ".join(paths[:SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")
                self.errors.append(f"snapshot {snap.short_id} refers to blobs that no index lists: {text}")
        affected = tuple(
            Affected(s.id, tuple(self.damage[s.id].paths), self.damage[s.id].more)
            for s in snapshots if s.id in self.damage
        )
        return CheckResult(
            errors=tuple(self.errors), notes=tuple(self.notes),
            damaged_packs=tuple(self.index.packs[n] for n in damaged),
            missing_packs=tuple(self.index.packs[n] for n in self.missing),
            affected=affected, index_files=index_files, packs=packs, snapshots=len(snapshots),
            packs_read=self.packs_read, bytes_read=self.bytes_read,
        )

    def _index_files_naming(self, numbers: set[int]) -> dict[int, str]:
        """Which index file names each of these packs (read again: only done when packs are missing)."""
        wanted = {self.index.packs[n]: n for n in numbers}
        found: dict[int, str] = {}
        for name in self.repo.index_files:
            try:
                names = self.repo.decode_index_file(name).names
            except CorruptData:
                continue
            for pack in names:
                if pack in wanted:
                    found.setdefault(wanted[pack], name)
        return found


def _snapshot_time(snap: Snapshot) -> float:
    try:
        return snap.datetime.timestamp()
    except (ValueError, TypeError):
        return 0.0


__all__ = ["Affected", "CheckProgress", "CheckResult", "Damage", "DataSubset", "check_repository", "find_damage"]
