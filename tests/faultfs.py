"""A FUSE file system with chosen faults, for backups that meet a failing source for real.

``mounted(spec, mountpoint)`` runs this module as its own process (mfusepy over libfuse3) and always
unmounts. ``spec`` maps absolute paths inside the mount to entries; every parent directory exists
implicitly. A file entry: ``{"size": N}`` plus any of

- ``"fault": "eio"``        every read at or past ``"eio_at"`` (default 0) fails with EIO;
- ``"fault": "fifo"``       the first ``"found"`` (default 1) lookups see a regular file, later ones a
                            FIFO (a file swapped for a FIFO between ``lstat`` and ``open``);
- ``"fault": "changing"``   every read moves the file's mtime and ctime on by one second;
- ``"fault": "stall"``      every read sleeps ``"stall_s"`` seconds first;
- ``"fault": "xattr_eio"``  listing its extended attributes fails with EIO;
- ``"link": "/other"``      another name of that file (same inode, same bytes, faults of ``/other``);
- ``"ino": N, "nlink": M``  the inode number and link count ``stat`` reports, whatever the truth (an
                            inode number freed and reused by another file during a walk).

A directory entry ``{"dir": true}`` may carry ``"fault": "listing_eio"`` (reading it fails with EIO)
or ``"fault": "vanish"`` (the first ``"found"`` lookups find it, later ones do not). Contents are ``content()``
of the path (of the first name, for a link), so a test knows every byte a restore must give back.
Caches are off (entry timeout 0, direct I/O): each system call of the backup reaches this process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Spec = dict[str, dict[str, Any]]


def content(path: str, size: int) -> bytes:
    """The bytes of the file stored under ``path`` (incompressible, different for every path)."""
    return random.Random(path).randbytes(size)


@contextmanager
def mounted(spec: Spec, mountpoint: Path, attr_timeout: float = 0, timeout: float = 30) -> Iterator[Path]:
    """Mount a fault file system with ``spec`` at ``mountpoint`` (created) for the ``with`` block.

    ``attr_timeout``: how long the kernel may keep a file's attributes. With 0 every ``fstat`` asks
    again (a file changing while read); a FIFO swap needs the first lookup's answer kept, so that
    ``lstat`` does not ask twice.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec_file:
        json.dump(spec, spec_file)
    proc = subprocess.Popen([sys.executable, __file__, spec_file.name, str(mountpoint), str(attr_timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None and proc.stdout else ""
                raise AssertionError(f"the fault file system did not mount at {mountpoint}: {out}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(spec_file.name)


def _serve(spec: Spec, mountpoint: str, attr_timeout: float) -> None:
    import mfusepy as fuse

    files: dict[str, dict[str, Any]] = {}
    dirs: dict[str, dict[str, Any]] = {"/": {}}
    for path, entry in spec.items():
        (dirs if entry.get("dir") else files)[path] = entry
        parent = os.path.dirname(path)
        while parent not in dirs:
            dirs[parent] = {}
            parent = os.path.dirname(parent)
    inodes: dict[str, int] = {}
    for n, path in enumerate(sorted(dirs) + sorted(p for p in files if "link" not in files[p]), start=1):
        inodes[path] = n
    for path, entry in files.items():
        if "link" in entry:
            inodes[path] = inodes[entry["link"]]
    names = {inodes[p]: p for p in files if "link" not in files[p]}  # inode → first name
    links = {ino: sum(1 for p in files if inodes[p] == ino) for ino in names}
    data = {ino: content(path, files[path]["size"]) for ino, path in names.items()}
    mtimes = {ino: 1_700_000_000 for ino in names}
    lookups: dict[str, int] = {}
    lock = threading.Lock()

    def first_name(path: str) -> str:
        return names[inodes[path]]

    def fault(path: str) -> str | None:
        entry = files.get(path) or dirs.get(path) or {}
        if path in files:
            entry = files[first_name(path)]
        fault_name: str | None = entry.get("fault")
        return fault_name

    class FaultFS(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with lock:
                seen = lookups[path] = lookups.get(path, 0) + 1
            if path in dirs:
                if fault(path) == "vanish" and seen > dirs[path].get("found", 1):
                    raise fuse.FuseOSError(errno.ENOENT)
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_ino": inodes[path],
                        "st_mtime": 1_700_000_000 * 10**9, "st_ctime": 1_700_000_000 * 10**9}
            if path not in files:
                raise fuse.FuseOSError(errno.ENOENT)
            ino = inodes[path]
            swapped = fault(path) == "fifo" and seen > files[first_name(path)].get("found", 1)
            kind = stat.S_IFIFO if swapped else stat.S_IFREG
            when = mtimes[ino] * 10**9
            shown = files[path]
            return {"st_mode": kind | 0o644, "st_nlink": shown.get("nlink", links[ino]),
                    "st_ino": shown.get("ino", ino), "st_size": len(data[ino]),
                    "st_blocks": (len(data[ino]) + 511) // 512, "st_mtime": when, "st_ctime": when}

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            if fault(path) == "listing_eio":
                raise fuse.FuseOSError(errno.EIO)
            inside = sorted(p for p in [*dirs, *files] if p != "/" and os.path.dirname(p) == path)
            return [(".", {"st_mode": stat.S_IFDIR}, 0), ("..", {"st_mode": stat.S_IFDIR}, 0),
                    *((os.path.basename(p), {"st_mode": stat.S_IFDIR if p in dirs else stat.S_IFREG,
                                             "st_ino": inodes[p]}, 0) for p in inside)]

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            entry = files[first_name(path)]
            ino = inodes[path]
            if entry.get("fault") == "eio" and offset + size > entry.get("eio_at", 0):
                raise fuse.FuseOSError(errno.EIO)
            if entry.get("fault") == "stall":
                time.sleep(entry["stall_s"])
            if entry.get("fault") == "changing":
                with lock:
                    mtimes[ino] += 1
            return data[ino][offset:offset + size]

        def listxattr(self, path: str) -> list[str]:
            if fault(path) == "xattr_eio":
                raise fuse.FuseOSError(errno.EIO)
            return []

        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            raise fuse.FuseOSError(errno.ENODATA)

    fuse.FUSE(FaultFS(), mountpoint, foreground=True, ro=True, use_ino=True, direct_io=True, attr_timeout=attr_timeout,
              entry_timeout=0, negative_timeout=0, default_permissions=True,
              debug=bool(os.environ.get("FAULTFS_DEBUG")))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        _serve(json.load(f), sys.argv[2], float(sys.argv[3]))
