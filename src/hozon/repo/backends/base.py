"""The whole storage contract: a few verbs over flat keys such as ``data/ab/ab12…`` or ``snapshots/…``.

A new backend is one module: a class with these members, a ``from_location`` constructor, and a
line in ``hozon.repo.backends.SCHEMES``; ``tests/e2e/test_backend_conformance.py`` is what it must pass.

- Every key is written once. ``put`` of an existing key with the same bytes is accepted (a retry);
  with other bytes it is refused with ``BackendError`` where the storage can tell, else the stored
  object stays as it is (content-addressed names make both right).
- Reading a key that is not there raises ``ObjectNotFound``; deleting one is no error.
- ``list`` yields every key under a prefix (a directory: ``data``, ``data/ab``) with its size; an
  interrupted upload is never listed nor readable: it is the backend's garbage, for ``clean_uploads``.
- Failures are ``HozonError``s (``RepositoryFull``, ``RepositoryReadOnly``, ``BackendError``).

Policy (caching, retries, rate limits) is added by wrapping a Backend, never by subclassing one.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple, Protocol, runtime_checkable


class Entry(NamedTuple):
    """One stored object as ``list`` yields it."""

    key: str
    size: int


class Backend(Protocol):
    location: str
    uploaders: int
    """How many puts the repository may run at once: 1 where parallel writes gain nothing (a local disk)."""

    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[Entry]: ...

    def delete(self, key: str) -> None: ...

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        """Remove what interrupted uploads older than ``max_age`` seconds left; how many there were."""
        ...


@runtime_checkable
class Retention(Protocol):
    """What a backend with write-once retention (S3 Object Lock) adds: objects nobody can delete
    before a date, Hozon included. ``hozon copy --lock-days`` writes through it; prune asks it."""

    def check_retention(self) -> None:
        """Raise a one-sentence error unless objects written here can be locked."""
        ...

    def put_retained(self, key: str, data: bytes | memoryview, until: datetime) -> None: ...

    def retain(self, key: str, until: datetime) -> None:
        """Keep an existing object locked until at least ``until`` (a lock is extended, never shortened)."""
        ...

    def locked_until(self, key: str) -> datetime | None: ...
