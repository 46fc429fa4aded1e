"""Snapshots: the last file a backup writes, naming the root of what it kept.

A snapshot exists once its file exists, and that file is written only after every pack and index
entry it needs, so a snapshot that can be listed can be restored.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from hozon.repo import schema

FORMAT_VERSION = 1


@dataclass
class Snapshot:
    time: str  # ISO 8601 with timezone
    hostname: str
    paths: list[str]
    kind: str  # "files" (later: "vm", "checkpoint")
    tree: str | None = None  # hex id of the root tree blob (file snapshots)
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    username: str = ""
    program_version: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific (disks of a VM, …)
    version: int = FORMAT_VERSION
    id: str = ""  # the file name; not stored inside the file

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("id")
        return doc

    @classmethod
    def decode(cls, data: bytes, snapshot_id: str) -> Snapshot:
        """From a snapshot file's plaintext; raises ``schema.Invalid`` when it is not a snapshot's shape."""
        return cls(**schema.snapshot(schema.parse_json(data)), id=snapshot_id)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def datetime(self) -> datetime:
        return datetime.fromisoformat(self.time)

    def listing(self) -> dict[str, Any]:
        """The shape ``hozon snapshots --json`` prints."""
        return {"id": self.id, "short_id": self.short_id, **self.to_json()}


def now_iso() -> str:
    """Now in UTC, ISO 8601 with ``+00:00``: hosts in different zones write comparable times, and
    readers show them in their own zone. Older snapshots carry their writer's offset; both parse."""
    return datetime.now(UTC).isoformat()


def this_host() -> str:
    return socket.gethostname()
