"""File-level backup: walk paths, store changed file contents and one tree blob per directory.

Unchanged files are recognised through the parent snapshot (same host and paths): a file whose
inode, size, mtime and ctime match its entry there, and whose chunks are all still live in the
repository, reuses that entry without being read. Every snapshot is still logically full.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from hozon import __version__
from hozon.chunking import CDC_MIN, ContentChunker
from hozon.pathmatch import compiled
from hozon.repo.pack import DATA, TREE
from hozon.repo.recover import adopt_orphan_packs
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso, this_host
from hozon.repo.tree import DIR, FILE, Node, encode_tree
from hozon.repo.writer import BlobWriter
from hozon.sources.files.metadata import data_extents, is_sparse, node_from_stat

ProgressCallback = Callable[["BackupCounters"], None]


@dataclass
class BackupOptions:
    paths: list[str]
    tags: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    hostname: str = ""


@dataclass
class BackupCounters:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    total_files: int = 0
    total_bytes: int = 0
    bytes_read: int = 0
    current: str = ""


@dataclass
class BackupResult:
    snapshot: Snapshot
    warnings: list[str]


def load_exclude_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


class _FileBackup:
    def __init__(
        self, repo: Repository, writer: BlobWriter, options: BackupOptions, progress: ProgressCallback | None
    ) -> None:
        self.repo = repo
        self.writer = writer
        self.options = options
        self.progress = progress
        self.counters = BackupCounters()
        self.warnings: list[str] = []
        self.chunker = ContentChunker(repo.master.chunker_seed)
        self._pending: list[tuple[Node, list[Future[bytes | None]]]] = []
        # (dev, ino) of a multi-link file → its first node, pending reads, and how it was counted
        self._hardlinks: dict[tuple[int, int], tuple[Node, list[Future[bytes | None]], str]] = {}
        self._failed: set[int] = set()  # id() of nodes whose file failed while being read
        self._read_lock = threading.Lock()  # bytes_read grows on workers too; ``+=`` is not atomic
        self._last_progress = 0.0

    # -- exclusion ------------------------------------------------------------------------------
    def excluded(self, path: str) -> bool:
        """Whether the absolute ``path`` matches an exclude pattern (docs/patterns.md)."""
        return bool(self.options.excludes) and compiled(tuple(self.options.excludes)).matches(path)

    # -- directories ----------------------------------------------------------------------------
    def backup_dir(self, path: str, parent_tree: str | None, root_dev: int | None) -> str:
        """Store the tree of directory ``path`` (recursively) and return its id."""
        previous = self._load_parent(parent_tree)
        live = self._live_chunks(previous)
        nodes: list[Node] = []
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            self.warn(path, exc)
            names = []
        for name in names:
            child = os.path.join(path, name)
            if self.excluded(child):
                continue
            node = self.backup_entry(child, name, previous.get(name), root_dev, live)
            if node is not None:
                nodes.append(node)
        return self.store_tree(nodes)

    def backup_entry(self, path: str, name: str, previous: Node | None, root_dev: int | None,
                     live: set[str]) -> Node | None:
        """``live``: the chunks of the previous snapshot's files beside this one that the repository still has."""
        try:
            st = os.lstat(path)
            node = node_from_stat(name, path, st)
        except OSError as exc:
            self.warn(path, exc)
            return None
        if node.type == DIR:
            self.counters.dirs += 1
            if root_dev is not None and st.st_dev != root_dev:
                node.subtree = self.store_tree([])  # a mount point: kept, its content is not
            else:
                parent_sub = previous.subtree if previous is not None and previous.type == DIR else None
                node.subtree = self.backup_dir(path, parent_sub, root_dev)
        elif node.type == FILE and not self.backup_file(path, node, st, previous, live):
            return None
        self._report(path)
        return node

    def store_tree(self, nodes: list[Node]) -> str:
        self._resolve_pending()
        if self._failed:
            nodes = [n for n in nodes if id(n) not in self._failed]
        return self.writer.store_blob(encode_tree(nodes), TREE).hex()  # small: no hand-off

    def _live_chunks(self, previous: dict[str, Node]) -> set[str]:
        """The chunks of a previous tree's files that may be referenced again, looked up all at once."""
        ids = [c for n in previous.values() if n.type == FILE for c in n.content]
        try:
            table = np.frombuffer(bytes.fromhex("".join(ids)), np.uint8).reshape(-1, 32)
        except ValueError:  # a malformed id in the parent only costs speed: those files are read again
            return set()
        return {c for c, ok in zip(ids, self.repo.index.live_mask(table).tolist(), strict=True) if ok}

    def _load_parent(self, tree_id: str | None) -> dict[str, Node]:
        if tree_id is None:
            return {}
        try:
            return {n.name: n for n in self.repo.load_tree(tree_id)}
        except Exception:  # an unreadable parent only costs speed: read everything again
            return {}

    # -- files ----------------------------------------------------------------------------------
    def backup_file(self, path: str, node: Node, st: os.stat_result, previous: Node | None, live: set[str]) -> bool:
        """Fill in the content of ``node``; False when the file could not be read (it was warned about).

        Such a file is left out of the snapshot: kept without its content, it would restore as an
        empty or zero-filled file that looks like real data.
        """
        link_key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and link_key in self._hardlinks:  # another name of a file already read
            first, first_futures, counted_as = self._hardlinks[link_key]
            node.extents, node.size, node.content = first.extents, first.size, first.content
            if first_futures:
                self._pending.append((node, first_futures))
            self._count(node, counted_as)  # a new file is new under each of its names, not "unmodified"
            return True
        futures: list[Future[bytes | None]] = []
        if previous is not None and self._unchanged(node, previous, live):
            node.content, node.extents = previous.content, previous.extents
            counted_as = "files_unmodified"
        else:
            counted_as = "files_new" if previous is None else "files_changed"
            read = self._read_content(path, node)
            if read is None:
                return False
            futures = read
        self._count(node, counted_as)
        if st.st_nlink > 1:
            self._hardlinks[link_key] = (node, futures, counted_as)
        return True

    def _count(self, node: Node, counter: str) -> None:
        self.counters.total_files += 1
        self.counters.total_bytes += node.size
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    def _unchanged(self, node: Node, previous: Node, live: set[str]) -> bool:
        same = previous.type == FILE and (previous.inode, previous.size, previous.mtime_ns, previous.ctime_ns) == (
            node.inode, node.size, node.mtime_ns, node.ctime_ns
        )
        return same and all(c in live for c in previous.content)

    def _read_content(self, path: str, node: Node) -> list[Future[bytes | None]] | None:
        """Start storing the file's chunks; None when it cannot be opened (warned about)."""
        try:
            fd = _open_for_reading(path)
        except OSError as exc:
            self.warn(path, exc)
            return None
        if node.size <= CDC_MIN:  # one chunk at most: read, hash and seal it all on a worker
            return self._pend(node, [self.writer.run(self._store_small_file, fd, path, node)])
        futures: list[Future[bytes | None]] = []
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if is_sparse(st):
                    node.extents = data_extents(f.fileno(), st.st_size)
                    for offset, length in node.extents:
                        f.seek(offset)
                        self._submit_all(self.chunker.chunks(f, length), futures)
                else:
                    node.size = self._submit_all(self.chunker.chunks(f), futures)
        except OSError as exc:
            self._fail(node, path, exc)
        return self._pend(node, futures)

    def _store_small_file(self, fd: int, path: str, node: Node) -> bytes | None:
        """Worker task: a file that fits one chunk, read and stored in one go."""
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                data = f.read(node.size)  # exactly: a larger read buffer costs more than the read
        except OSError as exc:
            self._fail(node, path, exc)
            return None
        node.size = len(data)  # what was read is what is kept, even if the file just changed
        self._add_read(len(data))
        return self.writer.store_blob(data, DATA) if data else None

    def _fail(self, node: Node, path: str, exc: OSError) -> None:
        """A read error after opening: the file is left out of its directory (see backup_file)."""
        self.warn(path, exc)
        self._failed.add(id(node))

    def _pend(self, node: Node, futures: list[Future[bytes | None]]) -> list[Future[bytes | None]]:
        self._pending.append((node, futures))
        return futures

    def _submit_all(self, chunks: Iterable[bytes], futures: list[Future[bytes | None]]) -> int:
        total = 0
        for chunk in chunks:
            futures.append(self.writer.run(self.writer.store_blob, chunk, DATA))
            total += len(chunk)
            self._add_read(len(chunk))
        return total

    def _add_read(self, n: int) -> None:
        with self._read_lock:
            self.counters.bytes_read += n

    def _resolve_pending(self) -> None:
        for node, futures in self._pending:
            if futures:
                node.content = [blob_id.hex() for f in futures if (blob_id := f.result()) is not None]
        self._pending = []

    # -- reporting ------------------------------------------------------------------------------
    def warn(self, path: str, exc: OSError) -> None:
        self.warnings.append(f"{path}: {exc.strerror or exc}")

    def _report(self, path: str) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._last_progress > 0.2:
            self._last_progress = now
            self.counters.current = path
            self.progress(self.counters)


Layout = dict[str, "Layout"]  # the directories from / down to the backed-up paths


def _root_tree(job: _FileBackup, paths: list[str], parent_root: str | None) -> str:
    """Build the tree from / down to each backed-up path, with the real metadata of every level."""
    if "/" in paths:  # the whole file system: / is no level above a path but the directory backed up
        root_dev = os.lstat("/").st_dev if job.options.one_file_system else None
        return job.backup_dir("/", parent_root, root_dev)
    layout: Layout = {}
    for p in paths:
        level = layout
        for part in PurePosixPath(p).parts[1:]:
            level = level.setdefault(part, {})

    def build(prefix: str, level: Layout, parent_tree: str | None) -> str:
        previous = job._load_parent(parent_tree)
        live = job._live_chunks(previous)
        nodes: list[Node] = []
        for name, sub in sorted(level.items()):
            path = os.path.join(prefix, name)
            prev = previous.get(name)
            if path in paths:
                root_dev = os.lstat(path).st_dev if job.options.one_file_system and os.path.exists(path) else None
                node = job.backup_entry(path, name, prev, root_dev, live)
            else:
                try:
                    node = node_from_stat(name, path, os.lstat(path))
                except OSError as exc:
                    job.warn(path, exc)
                    continue
                node.subtree = build(path, sub, prev.subtree if prev is not None else None)
            if node is not None:
                nodes.append(node)
        return job.store_tree(nodes)

    return build("/", layout, parent_root)


def find_parent(repo: Repository, hostname: str, paths: list[str]) -> Snapshot | None:
    candidates = [s for s in repo.readable_snapshots()[0] if s.kind == "files" and s.hostname == hostname
                  and sorted(s.paths) == paths]
    return candidates[-1] if candidates else None


def backup_files(
    repo: Repository, options: BackupOptions, progress: ProgressCallback | None = None
) -> BackupResult:
    """Run one file backup into an open, locked repository with a loaded index."""
    paths = sorted({os.path.abspath(p) for p in options.paths})
    hostname = options.hostname or this_host()
    parent = find_parent(repo, hostname, paths)
    started = time.monotonic()
    adopt_orphan_packs(repo)  # chunks a killed backup uploaded are reused, not uploaded again
    with BlobWriter(repo) as writer:
        job = _FileBackup(repo, writer, options, progress)
        tree = _root_tree(job, paths, parent.tree if parent else None)
    c = job.counters
    snapshot = Snapshot(
        time=now_iso(), hostname=hostname, paths=paths, kind="files", tree=tree, tags=sorted(options.tags),
        parent=parent.id if parent else None, username=_username(), program_version=__version__,
        summary={
            "files_new": c.files_new, "files_changed": c.files_changed, "files_unmodified": c.files_unmodified,
            "dirs": c.dirs, "total_files": c.total_files, "total_bytes": c.total_bytes, "bytes_read": c.bytes_read,
            "data_blobs_new": writer.stats.blobs_new, "data_added": writer.stats.bytes_new,
            "data_added_stored": writer.stats.bytes_stored, "warnings": len(job.warnings),
            "duration_s": round(time.monotonic() - started, 3),
        },
    )
    repo.save_snapshot(snapshot)
    return BackupResult(snapshot, job.warnings)


def _open_for_reading(path: str) -> int:
    """Open without following a symlink swapped in since lstat, and without touching atime."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)


def _username() -> str:
    try:
        return os.getlogin()
    except OSError:
        import getpass

        return getpass.getuser()
