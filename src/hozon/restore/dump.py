"""Writing part of a file snapshot to a stream: one file as its bytes, a directory as a tar archive.

This is ``hozon dump`` (restic's ``dump``): a restore for pipes (``| ssh host tar x``, ``> file``)
that never touches the local file system. Every chunk is verified on the way, as in a restore; a
chunk that fails stops the stream with an error, so a truncated stream never ends with success.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from hozon.errors import HozonError
from hozon.repo import browse
from hozon.repo.repository import Repository
from hozon.repo.tree import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SOCKET, SYMLINK, Node

_TAR_TYPES = {
    DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, FIFO: tarfile.FIFOTYPE,
    CHARDEV: tarfile.CHRTYPE, BLOCKDEV: tarfile.BLKTYPE,
}


def file_bytes(repo: Repository, node: Node) -> Iterator[bytes]:
    """A file's content in order, holes of a sparse file as zeroes, exactly ``node.size`` bytes."""
    chunks = (repo.load_blob(bytes.fromhex(c)) for c in node.content)
    written = 0
    if node.extents:  # the chunks hold the data extents back to back
        pending = b""
        for offset, length in node.extents:
            if offset > written:
                yield from _zeroes(offset - written)
                written = offset
            need = length
            while need:
                if not pending:
                    pending = next(chunks, b"")
                    if not pending:
                        raise HozonError(f"the content of {node.name!r} is shorter than its extents say")
                piece, pending = pending[:need], pending[need:]
                yield piece
                need -= len(piece)
                written += len(piece)
    else:
        for data in chunks:
            data = data[: max(0, node.size - written)]
            yield data
            written += len(data)
    if written < node.size:
        yield from _zeroes(node.size - written)


def _zeroes(n: int) -> Iterator[bytes]:
    block = bytes(min(n, 1 << 20))
    while n > 0:
        yield block[: min(n, len(block))]
        n -= len(block)


class _ChunkReader(io.RawIOBase):
    """A file's content as a readable stream, for ``tarfile.addfile``."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._buffer = piece
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def dump_tar(repo: Repository, root: tuple[str, Node], out: BinaryIO) -> int:
    """Write the entry ``root`` (a path and its node) and everything below it as a POSIX tar stream.

    Names in the archive are relative to the parent of ``root`` (``hozon dump S /etc`` gives
    ``etc/…``), hard links come out as tar hard links, extended attributes as PAX records.
    Returns the number of entries written.
    """
    path, node = root
    base = path.rstrip("/").rsplit("/", 1)[0]
    entries: Iterator[tuple[str, Node]] = iter([root])
    if node.type == DIR and node.subtree:
        entries = _chain(root, browse.walk(repo, node.subtree, path.rstrip("/")))
    links: dict[tuple[int, int], str] = {}
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry_path, entry in entries:
            name = entry_path[len(base):].lstrip("/")
            info = _tar_info(name, entry) if name else None  # the snapshot's root has no name of its own
            if info is None:
                continue
            key = (entry.device, entry.inode)
            if entry.type == FILE and entry.links > 1 and key in links:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, links[key], 0
                tar.addfile(info)
            elif entry.type == FILE:
                if entry.links > 1:
                    links[key] = name
                tar.addfile(info, io.BufferedReader(_ChunkReader(file_bytes(repo, entry)), 1 << 20))
            else:
                tar.addfile(info)
            count += 1
    return count


def _chain(first: tuple[str, Node], rest: Iterator[tuple[str, Node]]) -> Iterator[tuple[str, Node]]:
    yield first
    yield from rest


def _tar_info(name: str, node: Node) -> tarfile.TarInfo | None:
    if node.type == SOCKET:  # a socket has no tar type (tar skips them too)
        return None
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES.get(node.type, tarfile.REGTYPE)
    info.mode = stat.S_IMODE(node.mode)
    info.uid, info.gid, info.uname, info.gname = node.uid, node.gid, node.user, node.group
    info.mtime = node.mtime_ns / 1e9
    if node.type == FILE:
        info.size = node.size
    elif node.type == SYMLINK:
        info.linkname = node.target or ""
    elif node.type in (CHARDEV, BLOCKDEV):
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
    if node.xattrs:  # GNU tar's and bsdtar's records; binary values survive (hdrcharset=BINARY)
        info.pax_headers = {f"SCHILY.xattr.{k}": base64.b64decode(v).decode("utf-8", "surrogateescape")
                            for k, v in node.xattrs.items()}
    return info
