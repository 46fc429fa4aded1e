"""Repository locks: who is using the repository, so maintenance never pulls data from under a backup.

Backups, restores and checks take a shared lock; forget, prune, key changes and unlock an
exclusive one. A lock is a small sealed file; a live process refreshes it (a new file, then the old
one removed: files are write-once) every few minutes. A lock is stale when it was not refreshed
for STALE_AFTER seconds, or when it belongs to this host and its process is gone.

Prune is the one exclusive holder that tolerates running backups: it takes a ``prune`` lock, which
conflicts with exclusive and prune locks only, and relies on the grace rule in ``repo.prune``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass

from hozon.errors import CorruptData, RepositoryLocked
from hozon.repo import schema
from hozon.repo.repository import Repository
from hozon.repo.snapshots import this_host

REFRESH_EVERY = 5 * 60
STALE_AFTER = 30 * 60

SHARED = "shared"
EXCLUSIVE = "exclusive"
PRUNE = "prune"
_CONFLICTS = {SHARED: {EXCLUSIVE}, PRUNE: {EXCLUSIVE, PRUNE}, EXCLUSIVE: {SHARED, PRUNE, EXCLUSIVE}}


@dataclass(frozen=True)
class LockInfo:
    name: str
    kind: str
    hostname: str
    pid: int
    command: str
    started: float  # when the holder started: prune's grace rule compares against this
    refreshed: float

    @property
    def stale(self) -> bool:
        if time.time() - self.refreshed > STALE_AFTER:
            return True
        return self.hostname == this_host() and not process_alive(self.pid)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.kind} lock of '{self.command}' (pid {self.pid} on {self.hostname}, since {when})"


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_locks(repo: Repository) -> list[LockInfo]:
    """The readable lock files; fields a newer Hozon added are ignored (``schema.LOCK``)."""
    locks: list[LockInfo] = []
    for key in repo.backend.list("locks"):
        name = key.rsplit("/", 1)[-1]
        try:
            doc = schema.LOCK(schema.parse_json(repo.load_file(key, b"lock")))
        except (CorruptData, FileNotFoundError, schema.Invalid):
            continue  # vanished while listing (refreshed or released) or unreadable: not a holder
        locks.append(LockInfo(name=name, **doc))
    return locks


def remove_stale_locks(repo: Repository, everything: bool = False) -> list[LockInfo]:
    removed = [lock for lock in list_locks(repo) if everything or lock.stale]
    for lock in removed:
        repo.backend.delete(f"locks/{lock.name}")
    return removed


class Lock:
    """Held for the life of a ``with`` block; refreshed on a background thread."""

    def __init__(self, repo: Repository, kind: str, command: str) -> None:
        self.repo = repo
        self.kind = kind
        self.command = command
        self.started = time.time()
        self.name = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> str:
        doc = asdict(
            LockInfo("", self.kind, this_host(), os.getpid(), self.command, self.started, time.time())
        )
        doc.pop("name")
        name = os.urandom(16).hex()
        self.repo.backend.put(f"locks/{name}", self.repo.seal(json.dumps(doc).encode(), b"lock"))
        return name

    def acquire(self) -> None:
        self.name = self._write()
        for other in list_locks(self.repo):
            if other.name == self.name or other.stale:
                continue
            if other.kind in _CONFLICTS[self.kind]:
                self.repo.backend.delete(f"locks/{self.name}")
                raise RepositoryLocked(other.describe())
        self._thread = threading.Thread(target=self._refresh_loop, name="hozon-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            old, self.name = self.name, self._write()
            self.repo.backend.delete(f"locks/{old}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.name:
            self.repo.backend.delete(f"locks/{self.name}")

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
