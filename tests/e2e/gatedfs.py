"""A FUSE file system for tests that must hold a backup in the middle of its work.

It serves one directory with one file ``data`` of SIZE random bytes. While the file GATE
exists, a read waits (after creating READING, so a test knows the backup got there); remove GATE
and every read goes on. Run as ``python gatedfs.py MOUNTPOINT GATE READING SIZE`` (foreground).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Any

import mfusepy


class GatedFs(mfusepy.Operations):  # type: ignore[misc]
    def __init__(self, gate: str, reading: str, size: int) -> None:
        self.gate, self.reading, self.size = gate, reading, size
        self.data = os.urandom(size)
        self.now = time.time()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        common = {"st_uid": 0, "st_gid": 0, "st_atime": self.now, "st_mtime": self.now, "st_ctime": self.now}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
        if path == "/data":
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": self.size, **common}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", "data"]

    def open(self, path: str, flags: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if os.path.exists(self.gate):
            open(self.reading, "w").close()
            while os.path.exists(self.gate):
                time.sleep(0.05)
        return self.data[offset:offset + size]


if __name__ == "__main__":
    mountpoint, gate, reading, size = sys.argv[1:5]
    mfusepy.FUSE(GatedFs(gate, reading, int(size)), mountpoint, foreground=True, ro=True)
