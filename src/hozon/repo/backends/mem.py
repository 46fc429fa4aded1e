"""A repository held in a dict: fast unit tests of ``repo/`` without a disk.

The smallest complete implementation of the contract (``base.py``); it lives as long as the object.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from hozon.errors import BackendError, ObjectNotFound
from hozon.repo.backends.base import Entry


class MemoryBackend:
    uploaders = 1

    def __init__(self, name: str = "memory") -> None:
        self.location = f"mem:{name}"
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | memoryview) -> None:
        _check(key)
        content = bytes(data)
        with self._lock:
            stored = self._objects.setdefault(key, content)
        if stored != content:
            raise BackendError(f"{self.location}: {key} exists already with different content")

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            content = self._objects[key]
        except KeyError:
            raise ObjectNotFound(self.location, key) from None
        return content[offset:] if length is None else content[offset:offset + length]

    def exists(self, key: str) -> bool:
        return key in self._objects

    def list(self, prefix: str) -> Iterator[Entry]:
        base = prefix.rstrip("/")
        with self._lock:
            found = [Entry(k, len(v)) for k, v in self._objects.items()
                     if not base or k == base or k.startswith(f"{base}/")]
        return iter(found)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        return 0  # a put is one dict assignment: nothing is ever half-written


def _check(key: str) -> None:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise BackendError(f"invalid repository key {key!r}")
