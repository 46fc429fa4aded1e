"""A repository in a local directory (the default target)."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from hozon.errors import BackendError, RepositoryFull

TMP_DIR = "tmp"


class LocalBackend:
    """Files under ``root``; writes go to ``tmp/`` then appear atomically, so readers never see halves."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid repository key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes | memoryview) -> None:
        final = self._path(key)
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.tmp"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # the key exists already: write-once
                os.link(tmp, final)
            os.unlink(tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RepositoryFull(str(final)) from exc
            raise BackendError(f"cannot write {final}: {exc.strerror}") from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise BackendError(f"cannot read {path}: {exc.strerror}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                yield f"{rel}/{name}"

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"cannot delete {self._path(key)}: {exc.strerror}") from exc
