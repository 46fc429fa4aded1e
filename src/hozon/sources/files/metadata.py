"""Turning what ``lstat`` and friends say about a path into a tree ``Node`` (content excluded)."""

from __future__ import annotations

import base64
import errno
import grp
import os
import pwd
import stat
from functools import lru_cache

from hozon.repo.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node

_TYPES = {
    stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFIFO: FIFO,
    stat.S_IFCHR: CHARDEV, stat.S_IFBLK: BLOCKDEV, stat.S_IFSOCK: SOCKET,
}


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def node_from_stat(name: str, st: os.stat_result) -> Node:
    """Metadata of one directory entry from its ``lstat`` (or ``fstat``); no target, xattrs or content."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), FILE)
    node = Node(
        name=name, type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        user=user_name(st.st_uid), group=group_name(st.st_gid), mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, inode=st.st_ino, device=st.st_dev,
        links=st.st_nlink, size=st.st_size if kind == FILE else 0,
    )
    if kind in (CHARDEV, BLOCKDEV):
        node.rdev = st.st_rdev
    return node


def entry_path(dir_fd: int, name: str) -> str:
    """A short path to entry ``name`` of the directory open as ``dir_fd``, for calls that take no dir_fd.

    It resolves through the descriptor (Linux procfs), so it works at any depth, past PATH_MAX too.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


def read_xattrs(where: str | int) -> dict[str, str]:
    """Extended attributes of a path (a symlink itself, not followed) or of an open descriptor.

    Empty where the file system keeps none; OSError when they are there but cannot be read.
    """
    follow = isinstance(where, int)  # a descriptor has nothing to follow
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    values: dict[str, str] = {}
    for attr in names:
        try:
            values[attr] = base64.b64encode(os.getxattr(where, attr, follow_symlinks=follow)).decode()
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):  # ENODATA: removed since it was listed
                raise
    return values


def is_sparse(st: os.stat_result) -> bool:
    return st.st_blocks * 512 < st.st_size


def data_extents(fd: int, size: int) -> list[list[int]]:
    """The [offset, length] runs that hold data, found with SEEK_DATA/SEEK_HOLE."""
    extents: list[list[int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            extents.append([start, end - start])
        pos = end
    return extents
