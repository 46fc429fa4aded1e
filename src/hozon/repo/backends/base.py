"""The whole storage contract: five verbs over flat keys such as ``data/ab/ab12…`` or ``snapshots/…``.

Policy (caching, retries, rate limits) is added by wrapping a Backend, never by subclassing one.
Every key is written once: ``put`` of an existing key leaves the stored file as it is, which is
right for content-addressed names and harmless for random ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class Backend(Protocol):
    location: str

    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...
