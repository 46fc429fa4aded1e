"""Creating things only inside a restore target, whatever the stored names or the target hold.

Every path is walked from an open descriptor of the target, one component at a time with
O_NOFOLLOW, so neither a symlink already in the target nor one the restore itself created can
lead a write outside it. Stored names are checked before use: no '/', no NUL, not '.' or '..'.
"""

from __future__ import annotations

import errno
import os
import stat

from hozon.errors import RestoreOutsideTarget

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


def create_file(dir_fd: int, name: str) -> int:
    """A new, empty regular file for writing; whatever non-directory stood there is replaced."""
    check_name(name)
    _clear(dir_fd, name)
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)


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
