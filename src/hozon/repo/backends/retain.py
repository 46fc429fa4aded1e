"""Writes that stay for N days (S3 Object Lock, compliance mode): a wrapper, as policy is added.

Every pack and snapshot the wrapped repository writes is locked until the same date; ``retain``
extends the lock of packs written earlier that a new snapshot reuses, so none of its data can go
before it. Index files are not locked: prune must be able to replace them, and they can be rebuilt
from the packs (``hozon repair index``). Lock files must be removable, so they are not locked either.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from hozon.errors import UsageError
from hozon.repo.backends.base import Backend, Entry, Retention

RETAINED_PREFIXES = ("data/", "snapshots/")


class RetainedWrites:
    def __init__(self, backend: Backend, until: datetime) -> None:
        if not isinstance(backend, Retention):
            raise UsageError(f"{backend.location} cannot lock objects; --lock-days needs an S3 repository "
                             "in a bucket with Object Lock")
        backend.check_retention()
        self.inner, self.store, self.until = backend, backend, until
        self.location, self.uploaders = backend.location, backend.uploaders

    def put(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith(RETAINED_PREFIXES):
            self.store.put_retained(key, data, self.until)
        else:
            self.inner.put(key, data)

    def retain(self, key: str) -> None:
        self.store.retain(key, self.until)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[Entry]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        return self.inner.clean_uploads(max_age, dry_run)


def retaining(backend: Backend, days: int) -> RetainedWrites:
    return RetainedWrites(backend, datetime.now(UTC) + timedelta(days=days))
