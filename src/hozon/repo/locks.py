"""Repository locks: who is using the repository, so maintenance never pulls data from under a backup.

Backups, restores and checks take a shared lock; forget, prune, key changes and unlock an
exclusive one. A lock is a small sealed file; a live process refreshes it (a new file, then the old
one removed: files are write-once) every few minutes. A lock is stale when it was not refreshed
for STALE_AFTER seconds, or when it belongs to this host and its process is gone.

Prune is the one exclusive holder that tolerates running backups: it takes a ``prune`` lock, which
conflicts with exclusive and prune locks only, and relies on the grace rule in ``repo.prune``.

A holder that cannot refresh its lock (the storage fails, someone removed the file) may look stale
to a prune, which may then delete packs the holder still uses. So a failed refresh is retried and
logged, and the lock remembers if it was ever kept less well than HOLD_MARGIN (half of STALE_AFTER)
or its file vanished; before a snapshot is saved, ``confirm_held`` raises ``LockLost`` in that case.

For tests only, HOZON_LOCK_REFRESH_EVERY and HOZON_LOCK_STALE_AFTER (seconds) shorten the intervals.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass

from hozon.errors import CorruptData, HozonError, LockLost, LockNotRemoved, ObjectNotFound, RepositoryLocked
from hozon.repo import schema
from hozon.repo.repository import Repository
from hozon.repo.snapshots import this_host

REFRESH_EVERY = float(os.environ.get("HOZON_LOCK_REFRESH_EVERY", 5 * 60))
STALE_AFTER = float(os.environ.get("HOZON_LOCK_STALE_AFTER", 30 * 60))
HOLD_MARGIN = STALE_AFTER / 2  # a lock refreshed less often than this may look stale to another host's clock
RETRY_EVERY = REFRESH_EVERY / 5  # after a failed refresh
RETRY_LOCK_MAX_SLEEP = 10.0  # --retry-lock: the longest wait between two attempts

log = logging.getLogger(__name__)

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
    for key, _size in repo.backend.list("locks"):
        name = key.rsplit("/", 1)[-1]
        try:
            doc = schema.LOCK(schema.parse_json(repo.load_file(key, b"lock")))
        except (CorruptData, ObjectNotFound, schema.Invalid):
            continue  # vanished while listing (refreshed or released) or unreadable: not a holder
        locks.append(LockInfo(name=name, **doc))
    return locks


def remove_stale_locks(repo: Repository, everything: bool = False) -> list[LockInfo]:
    removed = [lock for lock in list_locks(repo) if everything or lock.stale]
    for lock in removed:
        repo.backend.delete(f"locks/{lock.name}")
    return removed


class Lock:
    """Held for the life of a ``with`` block; refreshed on a background thread.

    ``retry_for`` seconds: while another process holds a conflicting lock, keep trying (--retry-lock).
    """

    def __init__(self, repo: Repository, kind: str, command: str, retry_for: float = 0.0) -> None:
        self.repo = repo
        self.kind = kind
        self.command = command
        self.retry_for = retry_for
        self.started = time.time()
        self.name = ""
        self._stale_names: list[str] = []  # earlier files of ours a failed refresh could not remove
        self._kept_until = 0.0  # monotonic: the last successful write plus HOLD_MARGIN
        self._lost: str | None = None  # why the lock cannot be trusted any more (never cleared)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swapping = threading.Lock()  # confirm() must not look for a file a refresh just replaced

    def _write(self) -> str:
        doc = asdict(
            LockInfo("", self.kind, this_host(), os.getpid(), self.command, self.started, time.time())
        )
        doc.pop("name")
        name = os.urandom(16).hex()
        written = time.monotonic()
        self.repo.backend.put(f"locks/{name}", self.repo.seal(json.dumps(doc).encode(), b"lock"))
        self._kept_until = written + HOLD_MARGIN
        return name

    def acquire(self) -> None:
        deadline = time.monotonic() + self.retry_for
        pause = 0.5
        while (holder := self._try_acquire()) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RepositoryLocked(holder.describe())
            time.sleep(min(pause, left))
            pause = min(pause * 2, RETRY_LOCK_MAX_SLEEP)
        _HELD[self.repo] = self
        self._thread = threading.Thread(target=self._refresh_loop, name="hozon-lock", daemon=True)
        self._thread.start()

    def _try_acquire(self) -> LockInfo | None:
        """Our lock written, or (none left) the live lock that conflicts with it."""
        self.name = self._write()
        for other in list_locks(self.repo):
            if other.name == self.name or other.stale:
                continue
            if other.kind in _CONFLICTS[self.kind]:
                self.repo.backend.delete(f"locks/{self.name}")
                self.name = ""
                return other
        return None

    def _refresh_loop(self) -> None:
        wait = REFRESH_EVERY
        failure = ""  # the last one logged: a storage that keeps failing is said once, not every retry
        while not self._stop.wait(wait):
            if time.monotonic() > self._kept_until:  # also when this thread itself was held up
                self._lose(f"not refreshed for {HOLD_MARGIN:g} s")
            try:
                self._refresh()
                wait, failure = REFRESH_EVERY, ""
            except Exception as exc:  # a thread's traceback would be all the user saw
                wait = RETRY_EVERY
                kind = f"{type(exc).__name__} {getattr(exc.__cause__, 'errno', '')}"  # each try names a new file
                if kind != failure:
                    reason = exc.message if isinstance(exc, HozonError) else repr(exc)
                    log.warning("warning: could not refresh the repository lock (%s); retrying every %g s",
                                reason, wait)
                failure = kind

    def _refresh(self) -> None:
        with self._swapping:
            if self.name and not self.repo.backend.exists(f"locks/{self.name}"):
                self._lose(f"its file locks/{self.name} was removed by another process")
                self.name = ""
            new = self._write()
            if self.name:
                self._stale_names.append(self.name)
            self.name = new
            while self._stale_names:
                self.repo.backend.delete(f"locks/{self._stale_names[0]}")
                self._stale_names.pop(0)

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            log.warning("warning: the repository lock was lost (%s); '%s' will save no snapshot", reason,
                        self.command)

    def confirm(self) -> None:
        """Raise ``LockLost`` unless this lock has been kept all along (just before committing)."""
        with self._swapping:
            if self._lost is None and time.monotonic() > self._kept_until:
                self._lost = f"not refreshed for {HOLD_MARGIN:g} s"
            if self._lost is None and not self.repo.backend.exists(f"locks/{self.name}"):
                self._lost = f"its file locks/{self.name} was removed by another process"
        if self._lost is not None:
            raise LockLost(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.pop(self.repo, None)
        for name in [*self._stale_names, self.name]:
            if not name:
                continue
            try:
                self.repo.backend.delete(f"locks/{name}")
            except HozonError as exc:
                raise LockNotRemoved(name, exc.message) from exc
        self.name = ""

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.release()
        except LockNotRemoved as failure:
            if exc is None:
                raise
            exc.add_note(failure.message)  # the command's own error comes first


_HELD: weakref.WeakKeyDictionary[Repository, Lock] = weakref.WeakKeyDictionary()


def confirm_held(repo: Repository) -> None:
    """Before a snapshot is saved: raise ``LockLost`` unless the lock taken on ``repo`` was kept.

    A repository opened without a lock (a library caller that took none) has nothing to confirm.
    """
    lock = _HELD.get(repo)
    if lock is not None:
        lock.confirm()
