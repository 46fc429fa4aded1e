"""A repository in a local directory (the default target).

Durability: a file is fsynced before it is linked into place, and the directory that gained (or
lost) a name is fsynced after, as is the parent of every directory created on the way; so once
``put`` or ``delete`` returns, the change survives a power cut (docs/format.md, "Power cuts").
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from hozon.errors import BackendError, HozonError, ObjectNotFound, RepositoryFull, RepositoryReadOnly
from hozon.repo.backends.base import Entry

TMP_DIR = "tmp"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class LocalBackend:
    """Files under ``root``; writes go to ``tmp/`` then appear atomically, so readers never see halves."""

    uploaders = 1  # one disk: parallel writes only compete for it

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    @classmethod
    def from_location(cls, location: str) -> LocalBackend:
        """``PATH``, ``local:PATH`` or ``file:PATH``."""
        scheme, sep, rest = location.partition(":")
        return cls(rest if sep and scheme in {"local", "file"} else location)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid repository key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes | memoryview) -> None:
        final = self._path(key)
        fd, tmp = self.temp_file()
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.link(tmp, key)
        except OSError as exc:
            raise self.write_error(final, exc) from exc
        finally:
            with contextlib.suppress(OSError):  # on a read-only file system this fails too
                tmp.unlink(missing_ok=True)

    def temp_file(self) -> tuple[int, Path]:
        """A new private file under ``tmp/`` to write a key's content into, then :meth:`link`."""
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.tmp"
        try:
            _make_dirs(tmp.parent)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except OSError as exc:
            raise self.write_error(tmp, exc) from exc

    def link(self, tmp: Path, key: str) -> bool:
        """Give the written, fsynced ``tmp`` the name ``key`` too, durably; False if ``key`` existed
        (write-once). The caller removes ``tmp`` afterwards."""
        final = self._path(key)
        try:
            _make_dirs(final.parent)
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self.write_error(final, exc) from exc
        _sync_dir(final.parent)
        return True

    @staticmethod
    def write_error(path: Path, exc: OSError) -> HozonError:
        """The error for a failed write of ``path``: a full disk and a read-only one are told apart."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return RepositoryFull(str(path))
        if exc.errno in _READ_ONLY:
            return RepositoryReadOnly(f"cannot write {path}: {exc.strerror}")
        return BackendError(f"cannot write {path}: {exc.strerror}")

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError as exc:
            raise ObjectNotFound(self.location, key) from exc
        except OSError as exc:
            raise BackendError(f"cannot read {path}: {exc.strerror}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> Iterator[Entry]:
        """Keys under ``prefix`` with their sizes (a file removed meanwhile is left out, ``tmp/`` always)."""
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for dirpath, dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel == ".":
                dirs[:] = [d for d in dirs if d != TMP_DIR]
            elif rel == TMP_DIR:
                continue
            for name in files:
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                yield Entry(name if rel == "." else f"{rel}/{name}", size)

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        """Files under ``tmp/`` older than ``max_age``: a write that was interrupted (crash, full disk)."""
        cutoff = time.time() - max_age
        stale = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root / TMP_DIR) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # finished meanwhile
                except OSError as exc:
                    raise self.write_error(Path(entry.path), exc) from exc
                stale += 1
        return stale

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
            _sync_dir(path.parent)  # prune deletes index files before packs: keep that order on disk
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in _READ_ONLY:
                raise RepositoryReadOnly(f"cannot delete {path}: {exc.strerror}") from exc
            raise BackendError(f"cannot delete {path}: {exc.strerror}") from exc


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directories survive a power cut: each parent is synced after its mkdir."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    with contextlib.suppress(FileExistsError):  # made by a concurrent writer meanwhile
        path.mkdir()
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    """Make the names in a directory durable (a link or rename is in the directory, not the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
