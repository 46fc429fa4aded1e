"""File-level backup: walk paths, store changed file contents and one tree blob per directory.

Unchanged files are recognised through the parent snapshot (same host and paths): a file whose
inode, size, mtime and ctime match its entry there, and whose chunks are all still live in the
repository, reuses that entry without being read. Every snapshot is still logically full.

What cannot be read costs itself alone, and is named in a warning: a file whose read fails is left
out under every name (kept without its bytes, it would restore as data that never was), as is a
directory that cannot be opened or listed; a file that changed while it was read is kept as read.
Entries are reached through their directory's descriptor from a stack of open directories, so
neither recursion nor PATH_MAX limits the depth of a tree.
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from hozon import __version__
from hozon.chunking import CDC_MIN, ContentChunker
from hozon.compress import DEFAULT_LEVEL
from hozon.pathmatch import compiled
from hozon.repo.locks import confirm_held
from hozon.repo.pack import DATA, TREE
from hozon.repo.recover import adopt_orphan_packs
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso, this_host
from hozon.repo.tree import DIR, FILE, SYMLINK, Node, encode_tree
from hozon.repo.writer import BlobWriter
from hozon.sources.files.metadata import data_extents, entry_path, is_sparse, node_from_stat, read_xattrs
from hozon.sources.files.stall import StallWatch

ProgressCallback = Callable[["BackupCounters"], None]
WarningCallback = Callable[[str], None]  # told of a warning the moment it is found (a stalled read)
FileCallback = Callable[[str, str], None]  # told of each file kept: ("new"|"changed"|"unmodified", path)
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # bford.info/cachedir


@dataclass
class BackupOptions:
    paths: list[str]
    tags: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    one_file_system: bool = False
    hostname: str = ""
    stall_after: float = 60.0  # seconds one read may wait before its file is named in a warning
    exclude_caches: bool = False  # a directory with a valid CACHEDIR.TAG keeps only that file
    exclude_larger_than: int | None = None  # bytes: larger files are left out (as an exclude leaves them)
    compression: int | None = DEFAULT_LEVEL  # zstd level (compress.LEVELS); None: stored raw
    workers: int | None = None  # threads that read small files, hash, compress and seal (default: the cores)
    read_concurrency: int | None = None  # small files read at once on those threads (default: no fewer than them)
    dry_run: bool = False  # walk and read, store nothing: the summary says what would be added


@dataclass
class BackupCounters:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs: int = 0
    total_files: int = 0
    total_bytes: int = 0
    bytes_read: int = 0
    files_seen: int = 0  # files met by the walk so far (total_files counts those done)
    bytes_seen: int = 0
    expected_bytes: int = 0  # the parent snapshot's size, if there is one: an estimate of the total
    current: str = ""


@dataclass
class BackupResult:
    snapshot: Snapshot
    warnings: list[str]


def load_exclude_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class _Content:
    """The content of one regular file, shared by every name of a hard-linked file.

    A read that fails sets ``error``: every name of the file is then left out of the snapshot and
    named in a warning (kept without its bytes, it would restore as zeros that look like data).
    """

    path: str  # the name it was read through
    counted_as: str  # the counter each of its names adds to
    size: int
    extents: list[list[int]] | None = None
    ids: list[str] | None = None  # known at once for an unchanged file, else when its reads are done
    futures: list[Future[bytes | None]] = field(default_factory=list)
    error: str | None = None
    changed: bool = False  # its size or times moved while it was read

    def chunk_ids(self) -> list[str]:
        """The chunk ids, once every read and store is done (waits for them)."""
        if self.ids is None:
            self.ids = [blob_id.hex() for f in self.futures if (blob_id := f.result()) is not None]
            self.futures = []
        return self.ids


@dataclass
class _Dir:
    """A directory being walked: open as ``fd``, its names still to visit, its entries so far."""

    path: str
    fd: int
    names: Iterator[str]
    previous: dict[str, Node]  # its entries in the parent snapshot
    live: set[str]  # the chunks of those files the repository still has
    root_dev: int | None  # with --one-file-system: the device the walk stays on
    node: Node | None = None  # its own entry; None for /
    layout: Layout | None = None  # above the backed-up paths: only these names are walked
    entries: list[tuple[Node, str, _Content | None]] = field(default_factory=list)  # node, path, file content


Layout = dict[str, "Layout"]  # the directories from / down to the backed-up paths
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY


class _FileBackup:
    def __init__(self, repo: Repository, writer: BlobWriter, options: BackupOptions, progress: ProgressCallback | None,
                 on_warning: WarningCallback | None, on_file: FileCallback | None = None) -> None:
        self.repo = repo
        self.writer = writer
        self.options = options
        self.progress = progress
        self.on_warning = on_warning
        self.on_file = on_file
        self.counters = BackupCounters()
        self.warnings: list[str] = []
        self.watch = StallWatch(options.stall_after, self._stalled)  # close() it
        self.chunker = ContentChunker(repo.master.chunker_seed)
        self.paths: set[str] = set()
        self._hardlinks: dict[tuple[int, ...], _Content] = {}  # _link_key() of a multi-link file → its content
        self._read_lock = threading.Lock()  # bytes_read grows on workers too; ``+=`` is not atomic
        limit = options.read_concurrency  # small files read at once on the workers
        self._readers: contextlib.AbstractContextManager[object] = (
            threading.BoundedSemaphore(limit) if limit else contextlib.nullcontext())
        self._last_progress = 0.0

    # -- exclusion ------------------------------------------------------------------------------
    def excluded(self, path: str) -> bool:
        """Whether the absolute ``path`` matches an exclude pattern (docs/patterns.md)."""
        return bool(self.options.excludes) and compiled(tuple(self.options.excludes)).matches(path)

    # -- the walk -------------------------------------------------------------------------------
    def walk(self, paths: list[str], parent_root: str | None) -> str:
        """Store the trees from / down through ``paths`` and everything below them; the root tree's id.

        Depth first with a stack of open directories, not recursion, and every entry reached through
        its directory's descriptor: a tree deeper than PATH_MAX is walked like any other. A
        directory's tree is stored after its children's.
        """
        self.paths = set(paths)
        stack = [self._top(paths, parent_root)]
        try:
            while True:
                current = stack[-1]
                name = next(current.names, None)
                if name is not None:
                    child = self._visit(current, name)
                    if child is not None:
                        stack.append(child)
                    continue
                stack.pop()
                os.close(current.fd)
                tree = self.store_tree(current)
                if not stack:
                    return tree
                assert current.node is not None
                current.node.subtree = tree
                stack[-1].entries.append((current.node, current.path, None))
        finally:
            for left in stack:
                os.close(left.fd)

    def _top(self, paths: list[str], parent_root: str | None) -> _Dir:
        fd = os.open("/", _DIR_FLAGS)
        previous, live = self._previous(parent_root)
        if "/" not in paths:
            layout: Layout = {}
            for p in paths:
                level = layout
                for part in PurePosixPath(p).parts[1:]:
                    level = level.setdefault(part, {})
            return _Dir("/", fd, iter(sorted(layout)), previous, live, None, layout=layout)
        # The whole file system: / is no level above a path but the directory backed up.
        root_dev = os.fstat(fd).st_dev if self.options.one_file_system else None
        try:
            names = sorted(os.listdir(fd))
        except OSError as exc:
            self.warn("/", exc)
            names = []
        return _Dir("/", fd, iter(names), previous, live, root_dev)

    def _visit(self, parent: _Dir, name: str) -> _Dir | None:
        """Store entry ``name`` of ``parent``, or warn why not; a directory to walk next, if it is one."""
        path = os.path.join(parent.path, name)
        if parent.layout is None and self.excluded(path):
            return None
        try:
            st = os.lstat(name, dir_fd=parent.fd)
        except OSError as exc:
            self.warn(path, exc)
            return None
        self._report(path)
        previous = parent.previous.get(name)
        if parent.layout is not None and path not in self.paths:
            return self._level(parent, name, path, st, previous)
        root_dev = parent.root_dev
        if parent.layout is not None:  # a backed-up path: --one-file-system stays on its device
            root_dev = st.st_dev if self.options.one_file_system else None
        if stat.S_ISDIR(st.st_mode):
            return self._enter(parent, name, path, st, previous, root_dev)
        if stat.S_ISREG(st.st_mode):
            limit = self.options.exclude_larger_than
            if limit is None or st.st_size <= limit:
                self._file(parent, name, path, st, previous)
        else:
            try:
                parent.entries.append((self._node(parent.fd, name, path, st), path, None))
            except OSError as exc:
                self.warn(path, exc)
        return None

    def _node(self, dir_fd: int, name: str, path: str, st: os.stat_result, opened: int | None = None) -> Node:
        """The entry's metadata (``opened``: its own descriptor, if open); OSError if a symlink's target is unreadable.

        Extended attributes that cannot be read cost a warning, not the entry.
        """
        node = node_from_stat(name, st)
        if node.type == SYMLINK:
            node.target = os.readlink(name, dir_fd=dir_fd)
        try:
            node.xattrs = read_xattrs(entry_path(dir_fd, name) if opened is None else opened)
        except OSError as exc:
            self.warnings.append(f"{path}: extended attributes could not be read: {exc.strerror or exc}")
        return node

    def _level(self, parent: _Dir, name: str, path: str, st: os.stat_result, previous: Node | None) -> _Dir | None:
        """A directory above the backed-up paths: kept with its metadata, walked only towards them."""
        try:
            node = self._node(parent.fd, name, path, st)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)  # through a symlink too, as the path given goes
        except OSError as exc:
            self.warn(path, exc)
            return None
        assert parent.layout is not None
        layout = parent.layout[name]
        prev_tree = previous.subtree if previous is not None else None
        return _Dir(path, fd, iter(sorted(layout)), *self._previous(prev_tree), None, node, layout)

    def _enter(self, parent: _Dir, name: str, path: str, st: os.stat_result, previous: Node | None,
               root_dev: int | None) -> _Dir | None:
        """A directory to back up: its entry, and a walk into it unless it is on another device.

        One that cannot be opened or listed is left out (and named): stored empty, it would claim to be.
        """
        if root_dev is not None and st.st_dev != root_dev:  # a mount point: kept, its content is not
            node = self._node(parent.fd, name, path, st)
            node.subtree = self._store([])
            self.counters.dirs += 1
            parent.entries.append((node, path, None))
            return None
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent.fd)
        except OSError as exc:
            self.warn(path, exc)
            return None
        try:
            st = os.fstat(fd)  # the directory listed is the one described
            names = sorted(os.listdir(fd))
        except OSError as exc:
            os.close(fd)
            self.warn(path, exc)
            return None
        if self.options.exclude_caches and _is_cache(fd, names):
            names = ["CACHEDIR.TAG"]
        node = self._node(parent.fd, name, path, st, opened=fd)
        self.counters.dirs += 1
        prev_tree = previous.subtree if previous is not None and previous.type == DIR else None
        return _Dir(path, fd, iter(names), *self._previous(prev_tree), root_dev, node)

    def store_tree(self, walked: _Dir) -> str:
        """Store a walked directory's tree; a file whose read failed is left out here, and named."""
        nodes: list[Node] = []
        for node, path, content in walked.entries:
            if content is not None:
                ids = content.chunk_ids()  # waits for its reads: only then is ``error`` known
                if content.error is not None:
                    self.warnings.append(f"{path}: {content.error}")
                    continue
                node.content, node.size, node.extents = ids, content.size, content.extents
                if content.changed and path == content.path:
                    self.warnings.append(f"{path}: changed while it was read")
                self._count(node, content.counted_as, path)  # a new file is new under each of its names
            nodes.append(node)
        return self._store(nodes)

    def _store(self, nodes: list[Node]) -> str:
        return self.writer.store_blob(encode_tree(nodes), TREE).hex()  # small: no hand-off

    def _previous(self, tree_id: str | None) -> tuple[dict[str, Node], set[str]]:
        """A directory's entries in the parent snapshot, and the chunks of its files still in the repository."""
        previous = self._load_parent(tree_id)
        return previous, self._live_chunks(previous)

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
    def _file(self, parent: _Dir, name: str, path: str, st: os.stat_result, previous: Node | None) -> None:
        """A regular file's entry: its content reused from the parent snapshot, shared with another name
        of the same file, or read now (then its metadata is that of the file opened)."""
        content = self._hardlinks.get(_link_key(st)) if st.st_nlink > 1 else None
        fd: int | None = None
        if content is None:
            if previous is not None and self._unchanged(st, previous, parent.live):
                content = _Content(path, "files_unmodified", previous.size, previous.extents, ids=previous.content)
            else:
                opened = self._open(parent.fd, name, path)
                if opened is None:
                    return
                fd, st = opened
                content = _Content(path, "files_new" if previous is None else "files_changed", st.st_size)
            if st.st_nlink > 1:
                self._hardlinks[_link_key(st)] = content
            self.counters.files_seen += 1
            self.counters.bytes_seen += content.size
        parent.entries.append((self._node(parent.fd, name, path, st, opened=fd), path, content))
        if fd is not None:
            self._read(fd, content, st)

    def _unchanged(self, st: os.stat_result, previous: Node, live: set[str]) -> bool:
        same = previous.type == FILE and (previous.inode, previous.size, previous.mtime_ns, previous.ctime_ns) == (
            st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
        )
        return same and all(c in live for c in previous.content)

    def _open(self, dir_fd: int, name: str, path: str) -> tuple[int, os.stat_result] | None:
        """Open a file to read it, and its ``fstat``; None (warned about) if it cannot be, or is no longer
        a regular file: a FIFO or device swapped in since ``lstat`` is never waited on or read."""
        try:
            fd = _open_for_reading(dir_fd, name)
        except OSError as exc:
            self.warn(path, exc)
            return None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                os.set_blocking(fd, True)
                return fd, st
        except OSError as exc:
            os.close(fd)
            self.warn(path, exc)
            return None
        os.close(fd)
        self.warnings.append(f"{path}: no longer a regular file when it was opened; left out")
        return None

    def _read(self, fd: int, content: _Content, before: os.stat_result) -> None:
        """Start storing the chunks of the file open as ``fd``; a failure is kept in ``content.error``."""
        if before.st_size <= CDC_MIN:  # one chunk at most: read, hash and seal it all on a worker
            content.futures = [self.writer.run(self._store_small_file, fd, content, before)]
            return
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                watched = self.watch.watched(content.path, f)
                if is_sparse(before):
                    content.extents = data_extents(f.fileno(), before.st_size)
                    for offset, length in content.extents:
                        f.seek(offset)
                        self._submit_all(self.chunker.chunks(watched, length), content.futures)
                else:
                    content.size = self._submit_all(self.chunker.chunks(watched), content.futures)
                content.changed = _moved(before, os.fstat(f.fileno()))
        except OSError as exc:
            content.error = exc.strerror or str(exc)

    def _store_small_file(self, fd: int, content: _Content, before: os.stat_result) -> bytes | None:
        """Worker task: a file that fits one chunk, read and stored in one go."""
        try:
            with os.fdopen(fd, "rb", buffering=0) as f, self._readers, self.watch.reading(content.path):
                data = f.read(before.st_size)  # exactly: a larger read buffer costs more than the read
                content.changed = _moved(before, os.fstat(f.fileno()))
        except OSError as exc:
            content.error = exc.strerror or str(exc)
            return None
        content.size = len(data)  # what was read is what is kept, even if the file just changed
        self._add_read(len(data))
        return self.writer.store_blob(data, DATA) if data else None

    def _count(self, node: Node, counter: str, path: str) -> None:
        self.counters.total_files += 1
        self.counters.total_bytes += node.size
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        if self.on_file is not None:
            self.on_file(counter.removeprefix("files_"), path)

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

    # -- reporting ------------------------------------------------------------------------------
    def warn(self, path: str, exc: OSError) -> None:
        self.warnings.append(f"{path}: {exc.strerror or exc}")

    def _stalled(self, warning: str) -> None:
        """From the stall watch's thread: a read waits long; say so now, not only at the end."""
        self.warnings.append(warning)
        if self.on_warning is not None:
            self.on_warning(warning)

    def _report(self, path: str) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._last_progress > 0.2:
            self._last_progress = now
            self.counters.current = path
            self.progress(self.counters)


def _link_key(st: os.stat_result) -> tuple[int, ...]:
    """What makes two names one file: its inode, and its size and times (an inode number freed and
    reused during the walk names another file, which must not be given this one's bytes)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _is_cache(dir_fd: int, names: list[str]) -> bool:
    """Whether the directory open as ``dir_fd`` holds a CACHEDIR.TAG that starts with the signature."""
    if "CACHEDIR.TAG" not in names:
        return False
    try:
        fd = os.open("CACHEDIR.TAG", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)


def _moved(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (after.st_size, after.st_mtime_ns,
                                                                       after.st_ctime_ns)


def find_parent(repo: Repository, hostname: str, paths: list[str]) -> Snapshot | None:
    candidates = [s for s in repo.readable_snapshots()[0] if s.kind == "files" and s.hostname == hostname
                  and sorted(s.paths) == paths]
    return candidates[-1] if candidates else None


def backup_files(repo: Repository, options: BackupOptions, progress: ProgressCallback | None = None,
                 on_warning: WarningCallback | None = None, on_file: FileCallback | None = None) -> BackupResult:
    """Run one file backup into an open, locked repository with a loaded index.

    Every warning is in the result; ``on_warning`` also hears at once of those found while the backup
    may still wait long (a read that stalls), so the user knows on which file. A dry run writes
    nothing at all: its snapshot is not saved and has no id.
    """
    paths = sorted({os.path.abspath(p) for p in options.paths})
    hostname = options.hostname or this_host()
    parent = find_parent(repo, hostname, paths)
    started = time.monotonic()
    if not options.dry_run:
        adopt_orphan_packs(repo)  # chunks a killed backup uploaded are reused, not uploaded again
    _raise_open_file_limit()
    with BlobWriter(repo, options.workers, options.compression, options.dry_run) as writer:
        job = _FileBackup(repo, writer, options, progress, on_warning, on_file)
        expected = parent.summary.get("total_bytes") if parent is not None else None
        job.counters.expected_bytes = expected if isinstance(expected, int) else 0
        try:
            tree = job.walk(paths, parent.tree if parent else None)
        finally:
            job.watch.close()
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
    if options.dry_run:
        return BackupResult(snapshot, job.warnings)
    confirm_held(repo)  # a lock that went stale meanwhile may have let a prune delete our packs
    repo.save_snapshot(snapshot)
    return BackupResult(snapshot, job.warnings)


def _raise_open_file_limit() -> None:
    """The walk holds one descriptor per directory level: allow as many as the hard limit does.

    Past it, a directory that cannot be opened is warned about and left out, like any other.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # no higher than the kernel's nr_open, say
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


LEASE_BREAK_WAIT = 50.0  # seconds: the kernel gives a lease holder /proc/sys/fs/lease-break-time (45 by default)


def _open_for_reading(dir_fd: int, name: str) -> int:
    """Open without following a symlink swapped in since lstat, without touching atime, and without
    waiting: a FIFO swapped in opens at once instead of blocking until a writer comes.

    Without waiting, an open that conflicts with another process's lease (a Samba oplock) fails at
    once while the kernel asks the holder to give it up: it is tried again for as long as a holder
    may take.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    waited, delay = 0.0, 0.01
    while True:
        try:
            try:
                return os.open(name, flags | getattr(os, "O_NOATIME", 0), dir_fd=dir_fd)
            except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
                return os.open(name, flags, dir_fd=dir_fd)
        except BlockingIOError:
            if waited >= LEASE_BREAK_WAIT:
                raise
            time.sleep(delay)
            waited, delay = waited + delay, min(2 * delay, 1.0)


def _username() -> str:
    try:
        return os.getlogin()
    except OSError:
        import getpass

        return getpass.getuser()
