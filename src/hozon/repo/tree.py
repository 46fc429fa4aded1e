"""File trees as stored in a snapshot: one tree blob per directory, listing its entries.

A directory's entries are ``Node``s sorted by name; a sub-directory points at its own tree blob by
id, so unchanged directories are stored once across all snapshots. File names are kept as the
bytes the file system gave (non-UTF-8 names survive through surrogate escapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hozon.repo import schema

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
FIFO = "fifo"
CHARDEV = "chardev"
BLOCKDEV = "blockdev"
SOCKET = "socket"
NODE_TYPES = {FILE, DIR, SYMLINK, FIFO, CHARDEV, BLOCKDEV, SOCKET}


@dataclass
class Node:
    name: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    device: int = 0
    links: int = 1
    size: int = 0
    content: list[str] = field(default_factory=list)  # hex chunk ids, in file order
    extents: list[list[int]] | None = None  # [offset, length] data extents of a sparse file
    subtree: str | None = None  # hex id of a directory's tree blob
    target: str | None = None  # symlink target
    rdev: int = 0  # device number of a device node
    xattrs: dict[str, str] = field(default_factory=dict)  # name → base64 value

    def to_json(self) -> dict[str, Any]:
        # Leave out what is empty, so trees stay small and stable (and skip asdict's deep copy).
        doc: dict[str, Any] = {"name": self.name, "type": self.type}
        doc.update((k, v) for k, v in vars(self).items() if v and k not in ("name", "type"))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Node:
        """From a node that ``schema.NODE`` checked (known fields only, right types)."""
        return cls(**doc)


def encode_tree(nodes: list[Node]) -> bytes:
    ordered = sorted(nodes, key=lambda n: n.name)
    return json.dumps({"nodes": [n.to_json() for n in ordered]}, separators=(",", ":")).encode()


def decode_tree(data: bytes) -> list[Node]:
    """Raises ``schema.Invalid`` (a ValueError) for a tree that does not have a tree's shape."""
    return [Node.from_json(doc) for doc in schema.TREE(schema.parse_json(data))["nodes"]]
