"""Restoring a file snapshot into a target directory.

Three passes: walk the snapshot's trees (an explicit stack: any depth) creating the directory
skeleton, links and special files; write file contents, fetching and verifying chunks on a few
threads ahead of the writer; then set directory metadata deepest-first, so writing children does
not disturb a parent's mtime.

What cannot be read costs only itself, with a warning: a damaged or missing tree blob that
directory's contents, a missing or damaged chunk that file. A file is written under a temporary
name and takes its own only once whole, so a file in the target is never one with missing parts
(and a file it was to replace stays as it was). Includes and excludes are docs/patterns.md's.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import os
import pwd
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

from hozon.errors import HozonError, UsageError
from hozon.pathmatch import PatternList, State
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node
from hozon.restore import safe_fs

PREFETCH_CHUNKS = 16

# What creating one entry can raise besides the OS refusing: a damaged or hostile tree may hold values
# the OS calls reject (a NUL in a link target, an owner id out of range, a mode that is not a number).
# Each costs that entry only, with a warning; it never stops the restore.
_ENTRY_ERRORS = (OSError, ValueError, TypeError, OverflowError)
# Writing a file's content can also meet a chunk that is missing or damaged in the repository.
_LOAD_ERRORS = (HozonError, *_ENTRY_ERRORS)

_KINDS = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
          CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK}


def _reason(exc: Exception) -> str:
    if isinstance(exc, HozonError):
        return exc.message
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    if isinstance(exc, OverflowError):  # Python's words for it ("int too large to convert to C long") say little
        return "invalid entry in the snapshot (a number in it is out of range for this system)"
    return f"invalid entry in the snapshot ({exc})"


OVERWRITE = ("always", "if-changed", "if-newer", "never")


@dataclass
class RestoreOptions:
    """``overwrite``: what to do with an entry already in the target (restic 0.17's policies).

    always: replace it; if-changed: replace it unless it has the snapshot's type, size and mtime;
    if-newer: replace it only if the snapshot's mtime is newer; never: leave it. Directories are
    merged under every policy. ``dry_run`` writes nothing and counts what would be done.
    """

    target: str
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    overwrite: str = "always"
    dry_run: bool = False


@dataclass
class RestoreCounters:
    files: int = 0  # regular files written (or, in a dry run, to be written)
    total_files: int = 0  # regular files to write, once the directories are made
    dirs: int = 0
    bytes_written: int = 0
    total_bytes: int = 0
    skipped: int = 0  # entries left as they were in the target (the overwrite policy)
    overwritten: int = 0  # entries that replaced one in the target
    current: str = ""


@dataclass
class RestoreResult:
    counters: RestoreCounters
    warnings: list[str]
    existing: list[tuple[str, str]] = field(default_factory=list)  # dry run: ("replace"/"keep", path)


@dataclass
class _FileJob:
    parts: list[str]  # path below the target
    node: Node
    replaces: bool  # an entry of that name is in the target


@dataclass
class _Dir:
    """A directory of the snapshot on the walk: where it goes, and whether it is in the target yet."""

    parts: list[str]
    node: Node | None  # None for the root
    parent: _Dir | None
    includes: State
    excludes: State
    present: bool  # a directory of this name is in the target (before the restore or made by it)
    made: bool  # restored: created or merged, counted, gets its metadata
    replaces: bool = False  # a non-directory of this name is in the target, to be replaced
    fresh: bool = False  # made by this restore: nothing in it was there before (no need to look)


def _path(parts: list[str]) -> str:
    return "/" + "/".join(parts)


class _Restore:
    def __init__(self, repo: Repository, options: RestoreOptions,
                 progress: Callable[[RestoreCounters], None] | None, on_file: Callable[[str], None] | None) -> None:
        self.repo = repo
        self.options = options
        self.progress = progress
        self.on_file = on_file  # told of each file once it is whole in the target (from the workers)
        self.includes = PatternList(options.includes)
        self.excludes = PatternList(options.excludes)
        self.counters = RestoreCounters()
        self.warnings: list[str] = []
        self.files: list[_FileJob] = []
        self.dirs: list[tuple[list[str], Node]] = []
        self.links: dict[tuple[int, int], list[str]] = {}
        self.hardlinks: list[tuple[list[str], list[str], bool]] = []  # (first name, this name, replaces)
        self.failed: set[tuple[str, ...]] = set()  # files whose content could not be restored
        self.there: list[tuple[str, str]] = []  # in a dry run: ("replace" or "keep", path) per entry there
        self.root_fd = -1
        self.chain: safe_fs.DirChain | None = None
        self._count_lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._last_progress = 0.0

    def warn(self, parts: list[str], reason: str) -> None:
        with self._count_lock:
            self.warnings.append(f"{_path(parts)}: {reason}")

    def kept(self, parts: list[str]) -> None:
        """An entry in the target that the overwrite policy leaves as it is."""
        self.counters.skipped += 1
        if self.options.dry_run:
            self.there.append(("keep", _path(parts)))

    def replacing(self, parts: list[str], now: bool) -> None:
        """An entry in the target that the restore replaces (a file: counted once it is written)."""
        if self.options.dry_run:
            self.there.append(("replace", _path(parts)))
        if now or self.options.dry_run:
            self.counters.overwritten += 1

    # -- selection ------------------------------------------------------------------------------
    def wanted(self, includes: State, excludes: State) -> tuple[bool, bool]:
        """(restore this entry, something below it may be restored)."""
        if self.excludes and self.excludes.verdict(excludes)[0]:
            return False, False
        if not self.includes:
            return True, True
        return self.includes.verdict(includes)

    def keep_existing(self, st: os.stat_result, node: Node) -> bool:
        """Whether the overwrite policy leaves the entry ``st`` where the snapshot has ``node``."""
        policy = self.options.overwrite
        if policy == "never":
            return True
        if policy == "if-newer":
            return node.mtime_ns <= st.st_mtime_ns
        if policy == "if-changed":
            same_size = node.type not in (FILE, SYMLINK) or st.st_size == node.size
            return stat.S_IFMT(st.st_mode) == _KINDS.get(node.type) and same_size and st.st_mtime_ns == node.mtime_ns
        return False

    # -- pass 1: skeleton -----------------------------------------------------------------------
    def skeleton(self, tree_id: str) -> None:
        """Walk the snapshot's trees with an explicit stack (any depth), creating directories,
        links and special files, and listing the files to write."""
        root = _Dir([], None, None, self.includes.root(), self.excludes.root(), self.root_fd >= 0, True)
        stack: list[tuple[_Dir, str]] = [(root, tree_id)]
        while stack:
            directory, subtree = stack.pop()
            try:
                nodes = self.repo.load_tree(subtree)
            except HozonError as exc:  # a damaged or missing tree costs this directory's contents only
                if directory.node is None:
                    raise  # the snapshot's root: nothing at all can be restored
                self.warn(directory.parts, f"its contents cannot be read ({exc.message}); they are not restored")
                continue
            children = self.entries(directory, nodes)
            stack.extend(reversed(children))  # in name order, so files come in tree order
        for pattern in self.includes.unused():
            self.warnings.append(f"--include {pattern!r} matched nothing in the snapshot")

    def entries(self, directory: _Dir, nodes: list[Node]) -> list[tuple[_Dir, str]]:
        """Restore one directory's entries; the sub-directories to walk next."""
        seen: set[str] = set()
        below: list[tuple[_Dir, str]] = []
        for node in nodes:
            parts = [*directory.parts, node.name]
            try:
                safe_fs.check_name(node.name)
            except HozonError as exc:
                self.warnings.append(f"{'/'.join(['', *directory.parts, str(node.name)])!r}: {exc.message}")
                continue
            if node.name in seen:
                # Only a crafted tree lists a name twice; the second entry would replace what the first
                # made (a symlink by a directory, a file by a symlink), so it is refused, not merged.
                self.warnings.append(f"{_path(parts)!r}: refusing a second entry of the same name in one directory")
                continue
            seen.add(node.name)
            includes = self.includes.child(directory.includes, node.name) if self.includes else ()
            excludes = self.excludes.child(directory.excludes, node.name) if self.excludes else ()
            take, descend = self.wanted(includes, excludes)
            if not take and not (descend and node.type == DIR):
                continue
            try:
                existing = self.existing(directory, node.name)
                if node.type == DIR:
                    child = self.directory(directory, parts, node, includes, excludes, existing, take)
                    if child is not None and descend and node.subtree:
                        below.append((child, node.subtree))
                else:
                    self.create(directory, parts, node, existing)
            except _ENTRY_ERRORS as exc:
                self.warn(parts, _reason(exc))
        return below

    def dir_fd(self, parts: list[str]) -> int:
        assert self.chain is not None
        return self.chain.open(parts)

    def existing(self, directory: _Dir, name: str) -> os.stat_result | None:
        """What the target holds at ``name`` in ``directory`` (never followed), if anything."""
        if not directory.present or directory.fresh:
            return None
        try:
            return os.lstat(name, dir_fd=self.dir_fd(directory.parts))
        except FileNotFoundError:
            return None

    def directory(self, parent: _Dir, parts: list[str], node: Node, includes: State, excludes: State,
                  existing: os.stat_result | None, take: bool) -> _Dir | None:
        """The walk's record of a sub-directory; made now if it is restored itself, else when
        something below it is. None when a non-directory in its place is kept."""
        present = existing is not None and stat.S_ISDIR(existing.st_mode)
        if existing is not None and not present and self.keep_existing(existing, node):
            self.kept(parts)
            return None
        child = _Dir(parts, node, parent, includes, excludes, present, False, existing is not None and not present)
        if take:
            self.make(child)
        return child

    def make(self, directory: _Dir) -> None:
        """Restore ``directory`` and the directories above it that are not yet (include ancestors)."""
        pending = []
        at: _Dir | None = directory
        while at is not None and not at.made:
            pending.append(at)
            at = at.parent
        for d in reversed(pending):
            assert d.node is not None
            if not self.options.dry_run:
                assert self.chain is not None
                self.chain.open(d.parts, create=True)
                d.fresh = not d.present
                d.present = True
                self.dirs.append((d.parts, d.node))
            d.made = True
            self.counters.dirs += 1
            if d.replaces:
                self.replacing(d.parts, now=True)

    def create(self, directory: _Dir, parts: list[str], node: Node, existing: os.stat_result | None) -> None:
        if node.type == SOCKET:  # recorded, but not restorable: a socket is made by its server
            return
        if node.type not in _KINDS:
            raise ValueError(f"unknown entry type {node.type!r}")
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                if self.options.overwrite == "never":
                    self.kept(parts)
                else:
                    self.warn(parts, "a directory is in the way; it is left as it is")
                return
            if self.keep_existing(existing, node):
                self.kept(parts)
                return
        self.make(directory)
        if existing is not None:
            self.replacing(parts, now=node.type != FILE)
        if node.type == FILE:
            key = (node.device, node.inode)
            if node.links > 1 and key in self.links:
                self.hardlinks.append((self.links[key], parts, existing is not None))  # once the first is written
                return
            if node.links > 1:
                self.links[key] = parts
            self.files.append(_FileJob(parts, node, existing is not None))
            self.counters.total_bytes += node.size
            return
        if self.options.dry_run:
            return
        dir_fd = self.dir_fd(directory.parts)
        if node.type == SYMLINK:
            safe_fs.create_symlink(dir_fd, node.name, node.target or "")
        else:
            safe_fs.create_node(dir_fd, node.name, _KINDS[node.type] | 0o600, node.rdev)
        self.apply_metadata(dir_fd, node.name, node)

    # -- pass 2: contents -----------------------------------------------------------------------
    def contents(self, pool: ThreadPoolExecutor) -> None:
        """Files of one chunk are restored whole on the workers, many at once (they are most files);
        larger ones are written here in order while the workers fetch their chunks ahead."""
        small: deque[Future[None]] = deque()
        large: list[_FileJob] = []
        for job in self.files:
            if len(job.node.content) > 1 or job.node.extents:
                large.append(job)
                continue
            try:
                dir_fd = os.dup(self.dir_fd(job.parts[:-1]))
            except OSError as exc:
                self.fail(job, _reason(exc))
                continue
            small.append(pool.submit(self._restore_small_file, job, dir_fd))
            while len(small) > PREFETCH_CHUNKS:
                small.popleft().result()
        while small:
            small.popleft().result()
        self._stream_files(pool, large)

    def _restore_small_file(self, job: _FileJob, dir_fd: int) -> None:
        """Worker task: load, create, write, set metadata, publish; ``dir_fd`` is this task's own to close."""
        try:
            writer = _FileWriter(job, dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            self.fail(job, _reason(exc))
            return
        try:
            if job.node.content:
                writer.write(self._load_chunk(job.node.content[0]))
        except _LOAD_ERRORS as exc:
            writer.discard()
            self.fail(job, _reason(exc))
            return
        self.finish_file(writer)

    def _stream_files(self, pool: ThreadPoolExecutor, files: list[_FileJob]) -> None:
        def chunk_stream() -> Iterator[tuple[_FileJob, Future[bytes] | None]]:
            for job in files:
                yield job, None  # marks the start of a file
                for chunk in job.node.content:
                    yield job, pool.submit(self._load_chunk, chunk)

        window: deque[tuple[_FileJob, Future[bytes] | None]] = deque()
        stream = chunk_stream()
        current: _FileWriter | None = None

        def fill() -> None:
            while len(window) < PREFETCH_CHUNKS:
                item = next(stream, None)
                if item is None:
                    return
                window.append(item)

        fill()
        while window:
            job, future = window.popleft()
            fill()
            if future is None:
                if current is not None:
                    self.finish_file(current)
                current = self.open_file(job)
                continue
            if current is None or current.fd < 0:
                continue  # the file could not be created, or an earlier chunk failed
            try:
                current.write(future.result())
            except _LOAD_ERRORS as exc:  # a missing or damaged chunk, a full disk: this file only
                current.discard()
                self.fail(current.job, _reason(exc))
        if current is not None:
            self.finish_file(current)

    def _load_chunk(self, chunk: str) -> bytes:
        return self.repo.load_blob(bytes.fromhex(chunk))

    def open_file(self, job: _FileJob) -> _FileWriter:
        try:
            return _FileWriter(job, os.dup(self.dir_fd(job.parts[:-1])))
        except OSError as exc:
            self.fail(job, _reason(exc))
            return _FileWriter.failed(job)

    def fail(self, job: _FileJob, reason: str) -> None:
        """A file that could not be restored whole: named, and not left in the target."""
        kept = "the file in the target is left as it was" if job.replaces else "it is not restored"
        self.warn(job.parts, f"{reason}; {kept}")
        with self._count_lock:
            self.failed.add(tuple(job.parts))

    def finish_file(self, writer: _FileWriter) -> None:
        """Size, metadata, then the file's real name: only a whole file takes it."""
        if writer.fd < 0:
            return
        job = writer.job
        try:
            os.ftruncate(writer.fd, job.node.size)
            self.apply_metadata(None, writer.fd, job.node)
            writer.publish()
        except _ENTRY_ERRORS as exc:
            writer.discard()
            self.fail(job, _reason(exc))
            return
        with self._count_lock:
            self.counters.files += 1
            self.counters.bytes_written += writer.written
            self.counters.overwritten += job.replaces
        if self.on_file is not None:
            self.on_file(_path(job.parts))
        self._report(_path(job.parts))

    def link_files(self) -> None:
        for existing, parts, replaces in self.hardlinks:
            if tuple(existing) in self.failed:
                self.warn(parts, f"not restored: it is a hard link of {_path(existing)}, which could not be")
                continue
            try:
                dir_fd = self.dir_fd(parts[:-1])
                safe_fs.create_hardlink(self.root_fd, existing, dir_fd, parts[-1])
            except OSError as exc:
                self.warn(parts, _reason(exc))
                continue
            self.counters.overwritten += replaces

    # -- pass 3 and metadata --------------------------------------------------------------------
    def directory_metadata(self) -> None:
        for parts, node in reversed(self.dirs):
            try:
                self.apply_metadata(None, self.dir_fd(parts), node)
            except _ENTRY_ERRORS as exc:
                self.warn(parts, _reason(exc))

    def apply_metadata(self, dir_fd: int | None, target: str | int, node: Node) -> None:
        """Owner, xattrs, mode, then times (last: the others change ctime, not mtime).

        ``target`` is an open descriptor, or a name below ``dir_fd`` for entries that cannot be
        opened (symlinks, fifos, devices): those are never followed.
        """
        link = node.type == SYMLINK
        if self._as_root:
            os.chown(target, _uid_for(node), _gid_for(node), dir_fd=dir_fd, follow_symlinks=not link)
        if isinstance(target, int):
            for attr, value in node.xattrs.items():
                try:
                    os.setxattr(target, attr, base64.b64decode(value))
                except (OSError, ValueError) as exc:
                    self.warnings.append(f"{node.name}: cannot set xattr {attr!r}: {_reason(exc)}")
        if not link:
            os.chmod(target, node.mode, dir_fd=dir_fd)
        os.utime(target, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=not link)

    def _report(self, path: str) -> None:
        now = time.monotonic()
        if self.progress is not None and now - self._last_progress > 0.2:
            self._last_progress = now
            self.counters.current = path
            self.progress(self.counters)


class _FileWriter:
    """Writes one file under a temporary name in its directory, in order, leaving holes where a
    sparse file had them; ``publish`` gives it its name. Owns ``dir_fd``."""

    def __init__(self, job: _FileJob, dir_fd: int) -> None:
        self.job = job
        self.dir_fd = dir_fd
        self.fd, self.temp = safe_fs.create_temp_file(dir_fd) if dir_fd >= 0 else (-1, "")
        self.written = 0
        self._extents = deque(job.node.extents or [])
        self._pos = self._extents[0][0] if self._extents else 0
        self._left = self._extents[0][1] if self._extents else -1

    @classmethod
    def failed(cls, job: _FileJob) -> _FileWriter:
        return cls(job, -1)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._extents.popleft()
                self._pos, self._left = self._extents[0]
            n = len(view) if self._left < 0 else min(len(view), self._left)
            written = os.pwrite(self.fd, view[:n], self._pos)
            self._pos += written
            self.written += written
            if self._left >= 0:
                self._left -= written
            view = view[written:]

    def publish(self) -> None:
        os.close(self.fd)
        self.fd = -1
        try:
            safe_fs.publish(self.dir_fd, self.temp, self.job.parts[-1])
        except BaseException:
            self.discard()
            raise
        self.temp = ""
        self.discard()

    def discard(self) -> None:
        """Close, and remove the temporary file if it was not published."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp:
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.dir_fd)
            self.temp = ""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _uid_for(node: Node) -> int:
    """The owner by name when this system knows the name, else the stored number (as tar does)."""
    uid = _uid_of(node.user) if node.user else None
    return node.uid if uid is None else uid


def _gid_for(node: Node) -> int:
    gid = _gid_of(node.group) if node.group else None
    return node.gid if gid is None else gid


@lru_cache(maxsize=4096)
def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def restore_files(repo: Repository, snapshot: Snapshot, options: RestoreOptions,
                  progress: Callable[[RestoreCounters], None] | None = None,
                  on_file: Callable[[str], None] | None = None) -> RestoreResult:
    """Restore ``snapshot`` below ``options.target`` (created if missing); never writes outside it."""
    if snapshot.tree is None:
        raise HozonError(f"snapshot {snapshot.short_id} is a {snapshot.kind} snapshot, not a file snapshot",
                         hint="use: hozon vm restore")
    if options.overwrite not in OVERWRITE:
        raise UsageError(f"unknown overwrite policy {options.overwrite!r}; choose one of {', '.join(OVERWRITE)}")
    job = _Restore(repo, options, progress, on_file)
    job.root_fd = safe_fs.open_target(options.target, options.dry_run)
    job.chain = safe_fs.DirChain(job.root_fd)
    try:
        job.skeleton(snapshot.tree)
        job.counters.total_files = len(job.files)
        if options.dry_run:
            job.counters.files = len(job.files)
            job.counters.bytes_written = job.counters.total_bytes
        else:
            with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="hozon-restore") as pool:
                job.contents(pool)
            job.link_files()
            job.directory_metadata()
    finally:
        job.chain.close()
        if job.root_fd >= 0:
            os.close(job.root_fd)
    return RestoreResult(job.counters, job.warnings, job.there)
