"""Restoring image snapshots: each disk of a VM back to a thin qcow2 or raw image, or onto a device.

    map blobs ─► chunk ids ─► pool: read, decrypt, decompress, verify (a bounded window ahead)
                                   │ in disk order
    raw file / block device ◄── pwrite ◄─┤
    qcow2 ◄── a private qemu-nbd ◄── NBD write_many (4 in flight) ◄─┘

Targets (``restore_image(…, to, disk)``):

- a directory (created if missing): one image per disk, ``<name>.<fmt>`` (``vda.qcow2``), then
  ``<snapshot short id>.json`` (the snapshot as ``hozon snapshots --json`` lists it) and, when the
  snapshot kept the libvirt definition, ``domain.xml``. Nothing else is left there.
- with ``disk`` named, a file path (raw, or qcow2 when the name ends in ``.qcow2``), or an
  existing block device, written in place and raw.

New images are thin: a zero chunk (ZERO_ID) is never written, so it stays a hole in a raw file
and unallocated in a qcow2. A block device may hold old data, so there every zero chunk is
written as zeroes. Every chunk is verified on the way (its id, then its length: ``chunk_size``,
the last one ``size % chunk_size``). An image is written as ``<name>.partial`` and takes its name
only once complete and on stable storage, so an image with its final name is whole; a restore
that fails removes every file it created. An image already there is refused unless the overwrite
policy (``always``, ``if-newer``, ``never``) says to replace or keep it; a replaced image is only
renamed over once its successor is whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from hozon.errors import CorruptData, HozonError, UsageError
from hozon.nbd import NbdRequestError
from hozon.nbd.qemu_nbd import QemuNbd
from hozon.repo.imagemap import decode_map, image_disks, zero_mask
from hozon.repo.pack import pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.restore import safe_fs

FORMATS = ("qcow2", "raw")
PREFETCH_BYTES = 32 * 1024 * 1024  # chunks fetched ahead of the writer: 16 at 1 MiB (some MiB each)
NBD_DEPTH = 4
MAX_CHUNK_SIZE = 256 * 1024 * 1024
OVERWRITE = (None, "always", "if-newer", "never")  # None: an image already there is an error
OVERWRITE_HINT = "hozon vm restore replaces it with --overwrite always (or if-newer: only if older than the snapshot)"
QEMU_UTILS_HINT = "install the Debian package qemu-utils, or restore raw images: --format raw"

Progress = Callable[[int, int], None]
Chunks = Generator[tuple[int, int, bytes | None], None, None]  # (offset, length, data or None for zeroes)


@dataclass(frozen=True)
class DiskRestore:
    """What was written for one disk.

    ``bytes_written`` counts the bytes of data chunks written; ``zero_bytes`` the bytes of zero
    chunks (left as holes in a new image, written as zeroes on a block device).
    """

    name: str
    path: str
    format: str
    size: int
    bytes_written: int
    zero_bytes: int
    action: str = "written"  # "written" (a new image or a device), "replaced" (an image that was there), "skipped"


@dataclass(frozen=True)
class _Disk:
    """One disk of the snapshot, as validated: its chunk ids and where it goes."""

    name: str
    size: int
    chunk_size: int
    ids: npt.NDArray[np.uint8]  # (chunks, 32)
    path: str  # the final name (or the device)
    format: str
    device: bool
    action: str = "written"  # or "replaced", "skipped": an image of that name is there (the overwrite policy)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


# -- the snapshot's disks ------------------------------------------------------------------------


def own_format(disk: dict[str, Any]) -> str:
    """The format a disk of a snapshot restores in by itself: raw if it was raw, else qcow2 (thin)."""
    return "raw" if disk.get("format") == "raw" else "qcow2"


def _disk_entries(snapshot: Snapshot) -> list[dict[str, Any]]:
    """The snapshot's disk entries, checked: a damaged or hostile snapshot is refused here."""
    where = f"snapshots/{snapshot.id}"
    entries = image_disks(snapshot.extra)
    if not entries:
        raise HozonError(f"snapshot {snapshot.short_id} is a {snapshot.kind} snapshot with no disk images",
                         hint="restore a file snapshot with: hozon restore")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CorruptData(where, f"disk entry {i} is not an object")
        name, size, chunk_size, maps = (entry.get(k) for k in ("name", "size", "chunk_size", "maps"))
        if not isinstance(name, str):
            raise CorruptData(where, f"disk entry {i} has no name")
        safe_fs.check_name(name)  # it becomes a file name: no '/', not '..'
        if name in seen:
            raise CorruptData(where, f"disk {name!r} is listed twice")
        seen.add(name)
        if not _is_int(size) or size < 0 or not _is_int(chunk_size) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise CorruptData(where, f"disk {name!r} has an invalid size or chunk size")
        if not isinstance(maps, list) or not all(isinstance(m, str) and len(m) == 64 and _is_hex(m) for m in maps):
            raise CorruptData(where, f"disk {name!r} has malformed map ids")
    return entries


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _load_ids(repo: Repository, snapshot: Snapshot, entry: dict[str, Any]) -> npt.NDArray[np.uint8]:
    """Every chunk id of one disk, from its map blobs, checked against its size."""
    parts = []
    for map_hex in entry["maps"]:
        map_id = bytes.fromhex(map_hex)
        parts.append(decode_map(repo.load_blob(map_id), _blob_where(repo, map_id)))
    ids = np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)
    due = -(-entry["size"] // entry["chunk_size"])
    if len(ids) != due:
        raise CorruptData(f"snapshots/{snapshot.id}",
                          f"disk {entry['name']!r} has maps of {len(ids)} chunks where its size needs {due}")
    return ids


def _blob_where(repo: Repository, blob_id: bytes) -> str:
    loc = repo.index.lookup(blob_id)
    return pack_key(loc.pack) if loc is not None else f"index/ (blob {blob_id.hex()[:16]})"


# -- choosing the targets ------------------------------------------------------------------------


def _plan(repo: Repository, snapshot: Snapshot, to: str, disk: str | None, fmt: str | None,
          overwrite: str | None) -> tuple[list[_Disk], bool]:
    """The disks to write and where; True when ``to`` is a directory (it then gets the metadata)."""
    if to in ("", "-"):
        raise UsageError(f"--to {to!r} is not supported: a VM restore writes image files, a directory or a device")
    if overwrite not in OVERWRITE:
        raise UsageError(f"unknown overwrite policy {overwrite!r}; choose always, if-newer or never",
                         hint="if-changed needs a stored mtime, which a disk image does not have")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r}; choose qcow2 or raw")
    entries = _disk_entries(snapshot)
    if disk is not None:
        entries = [e for e in entries if e["name"] == disk]
        if not entries:
            names = ", ".join(e["name"] for e in _disk_entries(snapshot))
            raise UsageError(f"snapshot {snapshot.short_id} has no disk {disk!r}; it has: {names}")
    st = _lstat(to)
    into_dir = (st is None and disk is None) or (st is not None and stat.S_ISDIR(st.st_mode))
    device = st is not None and stat.S_ISBLK(st.st_mode)
    if not into_dir and disk is None:
        raise UsageError(f"{to} is not a directory",
                         hint="give a directory, or name one disk with --disk to write it to a file or device")
    if not into_dir and not device:
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{to} is not a directory, a block device or a new file")
        if os.path.normpath(os.path.abspath(to)).startswith("/dev/"):
            raise UsageError(f"{to} is not a block device")
    if device:
        if fmt == "qcow2":
            raise UsageError("a block device is written raw; --format qcow2 needs a file or a directory")
        fmt = "raw"
    elif fmt is None:
        fmt = "qcow2" if into_dir or to.endswith(".qcow2") else "raw"
    disks = []
    for entry in entries:
        path = os.path.abspath(os.path.join(to, f"{entry['name']}.{fmt}") if into_dir else to)
        there = None if device else _lstat(path)
        if there is not None and not stat.S_ISREG(there.st_mode):
            raise HozonError(f"{path} exists and is not a regular file; not replacing it")
        if there is not None and overwrite is None:
            raise HozonError(f"{path} exists; remove it or choose another --to",
                             hint=OVERWRITE_HINT)
        action = "written"
        if there is not None:
            newer = snapshot.datetime.timestamp() * 1e9 > there.st_mtime_ns
            action = "replaced" if overwrite == "always" or (overwrite == "if-newer" and newer) else "skipped"
        disks.append(_Disk(entry["name"], entry["size"], entry["chunk_size"], _load_ids(repo, snapshot, entry),
                           path, fmt, device, action))
    return disks, into_dir


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)  # a symlink to a device or directory is followed: the user named it
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HozonError(f"cannot use {path} as the restore target: {exc.strerror}") from exc


def _metadata(snapshot: Snapshot) -> dict[str, bytes]:
    listing = json.dumps(snapshot.listing(), indent=2, default=str) + "\n"
    files = {f"{snapshot.short_id or 'snapshot'}.json": listing.encode()}
    domain_xml = snapshot.extra.get("domain_xml")
    if isinstance(domain_xml, str) and domain_xml:
        files["domain.xml"] = domain_xml.encode()
    return files


# -- reading chunks ------------------------------------------------------------------------------


def _chunks(repo: Repository, pool: ThreadPoolExecutor, disk: _Disk) -> Chunks:
    """``(offset, length, data)`` for every chunk of ``disk`` in order; ``data`` is None for a zero chunk.

    Data chunks are fetched on ``pool`` a bounded window ahead of the consumer; a chunk repeated
    within the window is fetched once.
    """
    ids, zero, count = disk.ids, zero_mask(disk.ids), len(disk.ids)
    ahead = max(4, min(16, PREFETCH_BYTES // disk.chunk_size))
    window: deque[tuple[int, Future[bytes] | None]] = deque()
    recent: OrderedDict[bytes, Future[bytes]] = OrderedDict()
    fetching = 0
    nxt = 0
    try:
        while True:
            while nxt < count and fetching < ahead and len(window) < 64 * ahead:
                if zero[nxt]:
                    window.append((nxt, None))
                else:
                    chunk_id = ids[nxt].tobytes()
                    future = recent.get(chunk_id)
                    if future is None:
                        future = recent[chunk_id] = pool.submit(repo.load_blob, chunk_id)
                        if len(recent) > ahead:
                            recent.popitem(last=False)
                    window.append((nxt, future))
                    fetching += 1
                nxt += 1
            if not window:
                return
            index, future = window.popleft()
            length = disk.chunk_length(index)
            if future is None:
                yield index * disk.chunk_size, length, None
                continue
            fetching -= 1
            data = future.result()
            if len(data) != length:
                chunk_id = ids[index].tobytes()
                raise CorruptData(_blob_where(repo, chunk_id),
                                  f"data blob {chunk_id.hex()[:16]} holds {len(data)} bytes where chunk {index} "
                                  f"of disk {disk.name!r} has {length}")
            yield index * disk.chunk_size, length, data
    finally:
        for _, pending in window:
            if pending is not None:
                pending.cancel()


class _Counter:
    """Bytes done across all disks, reported at most every 0.1 s (and always at the end)."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last >= 0.1 or self.done >= self.total:
            self._last = now
            self.callback(self.done, self.total)


@dataclass
class _Tally:
    written: int = 0
    zero: int = 0


def _counted(chunks: Chunks, counter: _Counter, tally: _Tally) -> Chunks:
    for offset, length, data in chunks:
        yield offset, length, data
        if data is None:
            tally.zero += length
        else:
            tally.written += length
        counter.add(length)


# -- writing -------------------------------------------------------------------------------------


def _write_fd(fd: int, chunks: Chunks, zeroes: bool, chunk_size: int) -> None:
    """pwrite each data chunk (and, with ``zeroes``, each zero chunk as zeroes) at its offset."""
    zero_buffer = memoryview(bytes(chunk_size)) if zeroes else None
    for offset, length, data in chunks:
        if data is None:
            if zero_buffer is None:
                continue
            view = zero_buffer[:length]
        else:
            view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n


def _write_raw(disk: _Disk, fd: int, chunks: Chunks) -> None:
    os.ftruncate(fd, disk.size)  # all holes: zero chunks stay holes
    _write_fd(fd, chunks, False, disk.chunk_size)
    os.fsync(fd)


def _write_device(disk: _Disk, chunks: Chunks) -> None:
    try:
        fd = os.open(disk.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)  # O_EXCL: refused while mounted
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise HozonError(f"{disk.path} is in use (mounted, or held by another program); not overwriting it") \
                from exc
        raise HozonError(f"cannot open {disk.path} for writing: {exc.strerror}") from exc
    try:
        capacity = os.lseek(fd, 0, os.SEEK_END)
        if capacity < disk.size:
            raise HozonError(f"{disk.path} holds {capacity} bytes; disk {disk.name} needs {disk.size}")
        _write_fd(fd, chunks, True, disk.chunk_size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_qcow2(disk: _Disk, partial: str, chunks: Chunks) -> None:
    _run_tool(["qemu-img", "create", "-q", "-f", "qcow2", partial, str(disk.size)], f"create {partial}")
    with QemuNbd(partial, "qcow2") as client:
        if client.size < disk.size:
            raise HozonError(f"qemu-nbd serves {partial} as {client.size} bytes, short of {disk.size}")
        data = ((offset, payload) for offset, _, payload in chunks if payload is not None)
        client.write_many(data, NBD_DEPTH)  # zero chunks are skipped: they stay unallocated
        client.flush()
    fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_tool(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise HozonError(f"{args[0]} is not installed", hint=QEMU_UTILS_HINT) from exc
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if "No space left" in said:
            raise OSError(errno.ENOSPC, said)
        raise HozonError(f"{args[0]} could not {what}: {said}")


def _create(path: str) -> int:
    """A new file, never replacing one (nor following a symlink in its place)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if path.endswith(".partial"):
            raise HozonError(f"{path} exists: an earlier restore was interrupted or is still running",
                             hint="remove it once no restore is running") from None
        raise HozonError(f"{path} exists; remove it or choose another --to") from None


def _publish(partial: str, final: str, replace: bool = False) -> None:
    """Give a finished image its name: replacing the image there (``replace``), or unless something
    took that name meanwhile."""
    if replace:
        os.rename(partial, final)
        return
    try:
        os.link(partial, final)
    except FileExistsError:
        raise HozonError(f"{final} exists; remove it or choose another --to") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(final):  # a file system without hard links
            raise HozonError(f"{final} exists; remove it or choose another --to") from None
        os.rename(partial, final)
        return
    os.unlink(partial)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(exc: OSError, path: str, disk: str) -> HozonError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HozonError(f"no space left on the disk holding {path} while restoring disk {disk}",
                          hint="free space or choose another --to; the unfinished image was removed")
    return HozonError(f"cannot write {path}: {exc.strerror or exc}")


# -- the operation -------------------------------------------------------------------------------


def restore_image(repo: Repository, snapshot: Snapshot, to: str, disk: str | None = None, fmt: str | None = None,
                  progress: Progress | None = None, overwrite: str | None = None,
                  dry_run: bool = False) -> list[DiskRestore]:
    """Restore the disks of image snapshot ``snapshot`` to ``to``; what was done, disk by disk.

    ``to`` is a directory (created if missing) receiving ``<name>.<fmt>`` per disk plus the
    snapshot's metadata (``<short id>.json``, ``domain.xml``); or, with ``disk`` named, a new
    file or an existing block device. ``fmt`` is ``qcow2`` or ``raw``; by default qcow2 in a
    directory, raw for a device, and for a file qcow2 only if its name ends in ``.qcow2``.
    ``progress(done, total)`` is called with bytes of disk restored (zero chunks count).

    An image already there is an error unless ``overwrite`` says otherwise: ``always`` replaces
    it (and metadata files of other content), ``if-newer`` replaces it if it is older than the
    snapshot, ``never`` leaves it (the disk is reported skipped). A replaced image keeps its old
    content until the new one is whole. A failed restore removes the files it created (an image
    it already replaced stays replaced). ``dry_run`` checks and plans, and writes nothing.
    """
    disks, into_dir = _plan(repo, snapshot, to, disk, fmt, overwrite)
    skipped = [DiskRestore(d.name, d.path, d.format, d.size, 0, 0, "skipped") for d in disks if d.action == "skipped"]
    disks = [d for d in disks if d.action != "skipped"]
    metadata = _metadata(snapshot) if into_dir else {}
    for name, content in list(metadata.items()):
        path = os.path.join(to, name)
        if os.path.lexists(path) and (_same_content(path, content) or overwrite in ("never", "if-newer")):
            del metadata[name]  # there already, or kept by the policy
        elif os.path.lexists(path) and overwrite is None:
            raise HozonError(f"{path} exists with other content; remove it or choose another --to",
                             hint=OVERWRITE_HINT)
    if dry_run:
        return [DiskRestore(d.name, d.path, d.format, d.size, 0, 0, d.action) for d in disks] + skipped
    if any(d.format == "qcow2" for d in disks):
        missing = [tool for tool in ("qemu-img", "qemu-nbd") if shutil.which(tool) is None]
        if missing:
            raise HozonError(f"writing qcow2 images needs {' and '.join(missing)}, which "
                             f"{'is' if len(missing) == 1 else 'are'} not installed", hint=QEMU_UTILS_HINT)
    created: list[str] = []
    made_dir = False
    try:
        target_dir = to if into_dir else os.path.dirname(os.path.abspath(to))
        if not os.path.isdir(target_dir):
            try:
                os.makedirs(target_dir, exist_ok=True)
            except OSError as exc:
                raise HozonError(f"cannot create the directory {target_dir}: {exc.strerror}") from exc
            made_dir = True
        for d in disks:
            if d.action == "written" and not d.device and os.path.lexists(d.path):
                raise HozonError(f"{d.path} exists; remove it or choose another --to")

        results = []
        counter = _Counter(sum(d.size for d in disks), progress)
        workers = max(2, os.cpu_count() or 2)
        with ThreadPoolExecutor(workers, thread_name_prefix="hozon-image") as pool:
            for d in disks:
                results.append(_restore_disk(repo, pool, d, counter, created))
        for name, content in metadata.items():
            _write_file(os.path.join(to, name), content, created)
        if disks and not disks[0].device:
            _fsync_dir(target_dir)
        return results + skipped
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(to if into_dir else os.path.dirname(os.path.abspath(to)))
        raise


def _restore_disk(repo: Repository, pool: ThreadPoolExecutor, disk: _Disk, counter: _Counter,
                  created: list[str]) -> DiskRestore:
    """Write one disk; every file it creates is listed in ``created`` (for removal on failure)."""
    tally = _Tally()
    source = _chunks(repo, pool, disk)
    chunks = _counted(source, counter, tally)
    try:
        if disk.device:
            _write_device(disk, chunks)
        else:
            partial = disk.path + ".partial"
            fd = _create(partial)
            created.append(partial)
            try:
                if disk.format == "raw":
                    _write_raw(disk, fd, chunks)
            finally:
                os.close(fd)
            if disk.format == "qcow2":
                _write_qcow2(disk, partial, chunks)  # qemu-img fills the file claimed above
            _publish(partial, disk.path, replace=disk.action == "replaced")
            if disk.action != "replaced":
                created.append(disk.path)
    except NbdRequestError as exc:
        if exc.code == errno.ENOSPC:  # the NBD protocol's number for ENOSPC is Linux's
            raise _write_error(OSError(errno.ENOSPC, "no space"), disk.path, disk.name) from exc
        raise
    except OSError as exc:
        raise _write_error(exc, disk.path, disk.name) from exc
    finally:
        chunks.close()
        source.close()
    return DiskRestore(disk.name, disk.path, disk.format, disk.size, tally.written, tally.zero, disk.action)


def _same_content(path: str, content: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(content) + 1) == content
    except OSError:
        return False


def _write_file(path: str, content: bytes, created: list[str]) -> None:
    """A small file written whole under ``<path>.partial``, then named (replacing one there)."""
    partial = path + ".partial"
    try:
        fd = _create(partial)
        created.append(partial)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        existed = os.path.lexists(path)
        os.rename(partial, path)
        created.remove(partial)
        if not existed:
            created.append(path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HozonError(f"no space left on the disk holding {path}",
                             hint="free space or choose another --to") from exc
        raise HozonError(f"cannot write {path}: {exc.strerror or exc}") from exc
