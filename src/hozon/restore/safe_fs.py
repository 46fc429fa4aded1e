"""Creating things only inside a restore target, whatever the stored names or the target hold.

Every path is walked from an open descriptor of the target, one component at a time with
O_NOFOLLOW, so neither a symlink already in the target nor one the restore itself created can
lead a write outside it. Stored names are checked before use: no '/', no NUL, not '.' or '..'.
The target itself is checked once (``open_target``): what cannot work is one sentence.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from hozon.errors import HozonError, RestoreOutsideTarget, UsageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RestoreOutsideTarget(name)  # not a str: only a damaged or hostile tree has such a name


def _clear(dir_fd: int, name: str) -> None:
    """Remove a non-directory entry that stands where something else must go."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory is in the way", name)
    os.unlink(name, dir_fd=dir_fd)


def open_dir(dir_fd: int, name: str, create: bool) -> int:
    """Open (creating if asked) the real directory ``name`` below ``dir_fd``; never a symlink."""
    check_name(name)
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            st = os.lstat(name, dir_fd=dir_fd)
            if not stat.S_ISDIR(st.st_mode):
                _clear(dir_fd, name)
                os.mkdir(name, 0o700, dir_fd=dir_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def open_path(root_fd: int, parts: list[str]) -> int:
    """Open the directory at ``parts`` below ``root_fd`` without following any symlink."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            next_fd = open_dir(fd, part, create=False)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_temp_file(dir_fd: int) -> tuple[int, str]:
    """A new, empty file under a hidden temporary name in ``dir_fd``, and that name.

    A file is written under such a name and takes its real one (``publish``) only once whole, so a
    name in the target never holds a half-written file, and a file that was there survives a
    failed restore of it. A killed restore may leave ``.hozon-restore-*`` files behind.
    """
    while True:
        name = f".hozon-restore-{os.urandom(6).hex()}"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dir_fd), name
        except FileExistsError:
            continue


def publish(dir_fd: int, temp: str, name: str) -> None:
    """Give the finished file ``temp`` its name, replacing whatever non-directory had it."""
    check_name(name)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def create_symlink(dir_fd: int, name: str, target: str) -> None:
    check_name(name)
    _clear(dir_fd, name)
    os.symlink(target, name, dir_fd=dir_fd)


def create_node(dir_fd: int, name: str, mode: int, rdev: int = 0) -> None:
    """A fifo or device node."""
    check_name(name)
    _clear(dir_fd, name)
    if stat.S_ISFIFO(mode):
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
    else:
        os.mknod(name, mode, rdev, dir_fd=dir_fd)


def create_hardlink(root_fd: int, existing: list[str], dir_fd: int, name: str) -> None:
    """Link ``name`` to a file this restore wrote earlier at ``existing`` (parts below the root)."""
    check_name(name)
    src_fd = open_path(root_fd, existing[:-1])
    try:
        _clear(dir_fd, name)
        os.link(existing[-1], name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(src_fd)


def open_target(target: str, dry_run: bool) -> int:
    """The target directory, opened (created if missing, unless in a dry run: then -1 if missing).

    What cannot work is said in one sentence: ``-`` (it is no directory), an existing file, a path
    below a file, a directory this process cannot write in.
    """
    if target == "-":
        raise UsageError("--target - is not supported: a file restore writes a directory tree, not a stream")
    if not target:
        raise UsageError("--target is empty")
    try:
        st = os.stat(target)  # a symlink to a directory is followed: the user named it
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise UsageError(f"--target {target} lies below a file, not a directory") from None
    except OSError as exc:
        raise HozonError(f"cannot use {target} as the restore target: {exc.strerror}") from exc
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--target {target} exists and is not a directory")
    if st is None:
        if dry_run:
            _check_creatable(target)
            return -1
        try:
            os.makedirs(target)
        except NotADirectoryError:
            raise UsageError(f"--target {target} lies below a file, not a directory") from None
        except OSError as exc:
            raise HozonError(f"cannot create the restore target {target}: {exc.strerror}") from exc
    elif not dry_run and not os.access(target, os.W_OK | os.X_OK, effective_ids=True):
        raise HozonError(f"cannot write in the restore target {target}: "
                         f"{'read-only file system' if _read_only(target) else 'permission denied'}")
    return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _check_creatable(target: str) -> None:
    """For a dry run: the nearest existing directory above a missing target must take it."""
    above = os.path.dirname(os.path.abspath(target))
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UsageError(f"--target {target} lies below a file, not a directory")


def _read_only(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


class DirChain:
    """Open descriptors of the directories along the path last opened below a root descriptor.

    A restore visits directories in tree order, so the next one mostly shares all but the last
    component with the one before: it costs one ``openat``, whatever the depth, and no path is
    ever longer than one name (PATH_MAX does not limit the depth). At most ``MAX_OPEN`` of them
    stay open (the shallowest are closed first, and opened again when needed).
    """

    MAX_OPEN = 64

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._names: list[str] = []
        self._fds: list[int] = []  # -1: closed to stay under MAX_OPEN

    def open(self, parts: Sequence[str], create: bool = False) -> int:
        """The directory at ``parts`` (creating missing ones if asked); the chain keeps the descriptor."""
        common = 0
        while common < min(len(self._names), len(parts)) and self._names[common] == parts[common]:
            common += 1
        self._trim(common)
        self._reopen()
        for name in parts[common:]:
            fd = open_dir(self._fds[-1] if self._fds else self.root_fd, name, create)
            self._names.append(name)
            self._fds.append(fd)
            self._limit()
        return self._fds[-1] if self._fds else self.root_fd

    def _trim(self, keep: int) -> None:
        while len(self._fds) > keep:
            fd = self._fds.pop()
            self._names.pop()
            if fd >= 0:
                os.close(fd)

    def _reopen(self) -> None:
        """Open again the closed directories above the last one."""
        if not self._fds or self._fds[-1] >= 0:
            return
        start = max((i for i, fd in enumerate(self._fds) if fd >= 0), default=-1) + 1
        for i in range(start, len(self._fds)):
            try:
                self._fds[i] = open_dir(self._fds[i - 1] if i else self.root_fd, self._names[i], create=False)
            except OSError:
                self._trim(i)
                raise

    def _limit(self) -> None:
        open_fds = [i for i, fd in enumerate(self._fds) if fd >= 0]
        for i in open_fds[: max(0, len(open_fds) - self.MAX_OPEN)]:
            os.close(self._fds[i])
            self._fds[i] = -1

    def close(self) -> None:
        self._trim(0)
