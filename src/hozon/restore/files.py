"""Restoring a file snapshot into a target directory.

Three passes: create the directory skeleton, links and special files (walking the snapshot's
trees); write file contents, fetching and verifying chunks on a few threads ahead of the writer;
then set directory metadata deepest-first, so writing children does not disturb a parent's mtime.
"""

from __future__ import annotations

import base64
import fnmatch
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

from hozon.errors import HozonError
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node
from hozon.restore import safe_fs

PREFETCH_CHUNKS = 16

# What creating one entry can raise besides the OS refusing: a damaged or hostile tree may hold values
# the OS calls reject (a NUL in a link target, an owner id out of range, a mode that is not a number).
# Each costs that entry only, with a warning; it never stops the restore.
_ENTRY_ERRORS = (OSError, ValueError, TypeError, OverflowError)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    if isinstance(exc, OverflowError):  # Python's words for it ("int too large to convert to C long") say little
        return "invalid entry in the snapshot (a number in it is out of range for this system)"
    return f"invalid entry in the snapshot ({exc})"


@dataclass
class RestoreOptions:
    target: str
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)


@dataclass
class RestoreCounters:
    files: int = 0
    dirs: int = 0
    bytes_written: int = 0
    total_bytes: int = 0
    current: str = ""


@dataclass
class RestoreResult:
    counters: RestoreCounters
    warnings: list[str]


@dataclass
class _FileJob:
    parts: list[str]  # path below the target
    node: Node


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") or path == p.rstrip("/")
               for p in patterns)


class _Restore:
    def __init__(self, repo: Repository, options: RestoreOptions,
                 progress: Callable[[RestoreCounters], None] | None) -> None:
        self.repo = repo
        self.options = options
        self.progress = progress
        self.counters = RestoreCounters()
        self.warnings: list[str] = []
        self.files: list[_FileJob] = []
        self.dirs: list[tuple[list[str], Node]] = []
        self.links: dict[tuple[int, int], list[str]] = {}
        self.hardlinks: list[tuple[list[str], list[str]]] = []
        self.root_fd = -1
        self._open_dir: tuple[tuple[str, ...], int] | None = None
        self._count_lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._last_progress = 0.0

    # -- selection ------------------------------------------------------------------------------
    def wanted(self, path: str, is_dir: bool) -> tuple[bool, bool]:
        """(restore this entry, descend into it)."""
        if self.options.excludes and _matches(path, self.options.excludes):
            return False, False
        if not self.options.includes:
            return True, True
        if _matches(path, self.options.includes):
            return True, True
        prefix = path.rstrip("/") + "/"
        ancestor = is_dir and any(p.startswith(prefix) for p in self.options.includes)
        return ancestor, ancestor

    # -- pass 1: skeleton -----------------------------------------------------------------------
    def skeleton(self, tree_id: str, parts: list[str], dir_fd: int) -> None:
        seen: set[str] = set()
        for node in self.repo.load_tree(tree_id):
            path = "/".join(["", *parts, str(node.name)])
            try:
                safe_fs.check_name(node.name)
            except HozonError as exc:
                self.warnings.append(f"{path!r}: {exc.message}")
                continue
            if node.name in seen:
                # Only a crafted tree lists a name twice; the second entry would replace what the first
                # made (a symlink by a directory, a file by a symlink), so it is refused, not merged.
                self.warnings.append(f"{path!r}: refusing a second entry of the same name in one directory")
                continue
            seen.add(node.name)
            take, descend = self.wanted(path, node.type == DIR)
            if not take:
                continue
            try:
                self.create(node, [*parts, node.name], dir_fd, descend)
            except _ENTRY_ERRORS as exc:
                self.warnings.append(f"{path}: {_reason(exc)}")

    def create(self, node: Node, parts: list[str], dir_fd: int, descend: bool) -> None:
        name = parts[-1]
        if node.type == DIR:
            child_fd = safe_fs.open_dir(dir_fd, name, create=True)
            try:
                self.counters.dirs += 1
                self.dirs.append((parts, node))
                if descend and node.subtree:
                    self.skeleton(node.subtree, parts, child_fd)
            finally:
                os.close(child_fd)
        elif node.type == FILE:
            key = (node.device, node.inode)
            if node.links > 1 and key in self.links:
                self.hardlinks.append((self.links[key], parts))  # made once the first name is written
                return
            if node.links > 1:
                self.links[key] = parts
            self.files.append(_FileJob(parts, node))
            self.counters.total_bytes += node.size
        elif node.type == SYMLINK:
            safe_fs.create_symlink(dir_fd, name, node.target or "")
            self.apply_metadata(dir_fd, name, node)
        elif node.type in (FIFO, CHARDEV, BLOCKDEV):
            kind = {FIFO: stat.S_IFIFO, CHARDEV: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK}[node.type]
            safe_fs.create_node(dir_fd, name, kind | 0o600, node.rdev)
            self.apply_metadata(dir_fd, name, node)
        elif node.type != SOCKET:  # a socket is recorded but cannot be restored: it is made by its server
            raise ValueError(f"unknown entry type {node.type!r}")

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
                dir_fd = os.dup(self.parent_dir(job.parts[:-1]))
            except OSError as exc:
                self.warnings.append(f"/{'/'.join(job.parts)}: {exc.strerror or exc}")
                continue
            small.append(pool.submit(self._restore_small_file, job, dir_fd))
            while len(small) > PREFETCH_CHUNKS:
                small.popleft().result()
        while small:
            small.popleft().result()
        self._stream_files(pool, large)

    def _restore_small_file(self, job: _FileJob, dir_fd: int) -> None:
        """Worker task: load, create, write, set metadata; ``dir_fd`` is this task's own to close."""
        try:
            data = self._load_chunk(job.node.content[0]) if job.node.content else b""
            fd = safe_fs.create_file(dir_fd, job.parts[-1])
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, job.node.size)
                self.apply_metadata(None, fd, job.node)
            finally:
                os.close(fd)
        except _ENTRY_ERRORS as exc:
            self.warnings.append(f"/{'/'.join(job.parts)}: {_reason(exc)}")
            return
        finally:
            os.close(dir_fd)
        with self._count_lock:
            self.counters.files += 1
            self.counters.bytes_written += len(data)
        self._report("/" + "/".join(job.parts))

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
                data = future.result()
                current.write(data)
                self.counters.bytes_written += len(data)
            except _ENTRY_ERRORS as exc:  # a full target disk, or a damaged entry: this file only
                self.warnings.append(f"/{'/'.join(current.job.parts)}: {_reason(exc)}; the file is incomplete")
                os.close(current.fd)
                current.fd = -1
        if current is not None:
            self.finish_file(current)
        self.close_parent_dir()

    def _load_chunk(self, chunk: str) -> bytes:
        return self.repo.load_blob(bytes.fromhex(chunk))

    def open_file(self, job: _FileJob) -> _FileWriter:
        try:
            fd = safe_fs.create_file(self.parent_dir(job.parts[:-1]), job.parts[-1])
        except OSError as exc:
            self.warnings.append(f"/{'/'.join(job.parts)}: {exc.strerror or exc}")
            return _FileWriter(job, -1)
        return _FileWriter(job, fd)

    def parent_dir(self, parts: list[str]) -> int:
        """An open descriptor of the directory at ``parts``; files come in directory order, so the
        last one is kept open for the next file (walking the path again per file cost a third of
        a restore of many small files)."""
        key = tuple(parts)
        if self._open_dir is not None and self._open_dir[0] == key:
            return self._open_dir[1]
        self.close_parent_dir()
        fd = safe_fs.open_path(self.root_fd, parts)
        self._open_dir = (key, fd)
        return fd

    def close_parent_dir(self) -> None:
        if self._open_dir is not None:
            os.close(self._open_dir[1])
            self._open_dir = None

    def finish_file(self, writer: _FileWriter) -> None:
        if writer.fd < 0:
            return
        node = writer.job.node
        try:
            os.ftruncate(writer.fd, node.size)
            self.apply_metadata(None, writer.fd, node)
        except _ENTRY_ERRORS as exc:
            self.warnings.append(f"/{'/'.join(writer.job.parts)}: {_reason(exc)}")
        finally:
            os.close(writer.fd)
        self.counters.files += 1
        self._report("/" + "/".join(writer.job.parts))

    def link_files(self) -> None:
        for existing, parts in self.hardlinks:
            try:
                dir_fd = safe_fs.open_path(self.root_fd, parts[:-1])
                try:
                    safe_fs.create_hardlink(self.root_fd, existing, dir_fd, parts[-1])
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                self.warnings.append(f"/{'/'.join(parts)}: {exc.strerror or exc}")

    # -- pass 3 and metadata --------------------------------------------------------------------
    def directory_metadata(self) -> None:
        for parts, node in reversed(self.dirs):
            try:
                fd = safe_fs.open_path(self.root_fd, parts)
            except OSError as exc:
                self.warnings.append(f"/{'/'.join(parts)}: {exc.strerror or exc}")
                continue
            try:
                self.apply_metadata(None, fd, node)
            except _ENTRY_ERRORS as exc:
                self.warnings.append(f"/{'/'.join(parts)}: {_reason(exc)}")
            finally:
                os.close(fd)

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
    """Writes a file's chunks in order, leaving holes where a sparse file had them."""

    def __init__(self, job: _FileJob, fd: int) -> None:
        self.job = job
        self.fd = fd
        self._extents = deque(job.node.extents or [])
        self._pos = self._extents[0][0] if self._extents else 0
        self._left = self._extents[0][1] if self._extents else -1

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._extents.popleft()
                self._pos, self._left = self._extents[0]
            n = len(view) if self._left < 0 else min(len(view), self._left)
            written = os.pwrite(self.fd, view[:n], self._pos)
            self._pos += written
            if self._left >= 0:
                self._left -= written
            view = view[written:]


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
                  progress: Callable[[RestoreCounters], None] | None = None) -> RestoreResult:
    """Restore ``snapshot`` below ``options.target`` (created if missing); never writes outside it."""
    if snapshot.tree is None:
        raise HozonError(f"snapshot {snapshot.short_id} is a {snapshot.kind} snapshot, not a file snapshot",
                         hint="use: hozon vm restore")
    os.makedirs(options.target, exist_ok=True)
    job = _Restore(repo, options, progress)
    job.root_fd = os.open(options.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        job.skeleton(snapshot.tree, [], job.root_fd)
        with ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="hozon-restore") as pool:
            job.contents(pool)
        job.link_files()
        job.directory_metadata()
    finally:
        os.close(job.root_fd)
    return RestoreResult(job.counters, job.warnings)

