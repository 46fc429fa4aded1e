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


def node_from_stat(name: str, path: str, st: os.stat_result) -> Node:
    """Metadata of one directory entry; raises OSError only for what stops us reading it at all."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), FILE)
    node = Node(
        name=name, type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        user=user_name(st.st_uid), group=group_name(st.st_gid), mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns, inode=st.st_ino, device=st.st_dev,
        links=st.st_nlink, size=st.st_size if kind == FILE else 0,
    )
    if kind == SYMLINK:
        node.target = os.readlink(path)
    elif kind in (CHARDEV, BLOCKDEV):
        node.rdev = st.st_rdev
    node.xattrs = read_xattrs(path)
    return node


def read_xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENOENT):
            return {}
        raise
    values: dict[str, str] = {}
    for attr in names:
        try:
            values[attr] = base64.b64encode(os.getxattr(path, attr, follow_symlinks=False)).decode()
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
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
