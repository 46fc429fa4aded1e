"""Carrying out one run: the backup its job names, into the namespace's repository on the server.

The repository is ``hozon+https://HOST:PORT/NS`` opened with the password the agent got at
enrolment, under the same shared lock ``hozon backup`` takes, and the work is the library call the
command line makes (``backup_files``, ``backup_vm``, with ``checkpoint=True`` for a checkpoint):
nothing is re-implemented here. Every snapshot is tagged ``job:NAME``, so the job's snapshots can
be found even if the finish report is lost.

A run is cancelled (the agent stops, or the server says the run is no longer ours) through the
progress callbacks the backup code calls as it reads: the next one raises, and the backup unwinds
as on Ctrl-C (nothing half-written is named a snapshot; the guardian undoes the VM's state).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hozon.agent.client import Assignment
from hozon.agent.config import AgentConfig
from hozon.backup.files import BackupCounters, BackupOptions, backup_files
from hozon.backup.image import ImageBackupOptions, backup_vm
from hozon.errors import HozonError
from hozon.repo.backends.remote import SCHEME, RemoteBackend
from hozon.repo.locks import SHARED, Lock
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.sources.libvirt import LibvirtSource

MAX_REASON_WARNINGS = 3  # warnings named in a run's one-line reason (all of them go to its log)


class RunCancelled(HozonError):
    """The run was stopped before it saved a snapshot (the agent stops, or the server took it back)."""


class RunRefused(HozonError):
    """The run cannot start here (another run holds its VM)."""


@dataclass
class Outcome:
    """How a run ended: what ``…/finish`` is told."""

    state: str  # succeeded, warning or failed
    reason: str = ""
    snapshot_id: str | None = None
    bytes_read: int = 0
    bytes_stored: int = 0
    lines: list[str] = field(default_factory=list)  # for the run's log

    def report(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "snapshot_id": self.snapshot_id,
                "bytes_read": self.bytes_read, "bytes_stored": self.bytes_stored}


class Progress:
    """What the run has done so far, shared between the backup (which updates it) and the reporter
    thread (which sends it); ``cancel`` makes the backup's next callback raise ``RunCancelled``."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.current = ""
        self.started = time.monotonic()
        self.cancelled: str | None = None
        self._mutex = threading.Lock()
        self._last: tuple[float, int] = (self.started, 0)

    def cancel(self, why: str) -> None:
        self.cancelled = self.cancelled or why

    def update(self, bytes_read: int, current: str) -> None:
        if self.cancelled is not None:
            raise RunCancelled(self.cancelled)
        with self._mutex:
            self.bytes_read, self.current = bytes_read, current

    def files(self, counters: BackupCounters) -> None:
        self.update(counters.bytes_read, counters.current)

    def image(self, done: int, total: int) -> None:
        self.update(done, f"{done * 100 // max(total, 1)}% of {total} bytes")

    def snapshot(self) -> dict[str, Any]:
        """The progress document: bytes read, the rate since the last report, what is being read."""
        with self._mutex:
            now, read = time.monotonic(), self.bytes_read
            then, before = self._last
            self._last = (now, read)
            return {"bytes_read": read, "rate": round(max(read - before, 0) / max(now - then, 1e-3), 1),
                    "current": self.current[-4096:]}


def repository_location(config: AgentConfig) -> str:
    return f"{SCHEME}://{config.url.removeprefix('https://')}/{config.namespace}"


def execute(config: AgentConfig, run: Assignment, progress: Progress, guard: VmGuard) -> Outcome:
    """Carry out ``run``; failures the user can act on become a failed Outcome with one sentence."""
    if run.namespace != config.namespace:
        return Outcome("failed", f"run {run.run_id} writes into namespace {run.namespace}, but this agent "
                                 f"belongs to {config.namespace}")
    try:
        if run.kind == "files":
            return _files(config, run, progress)
        if run.kind in ("vm", "checkpoint"):
            with guard.hold(str(run.spec["vm"]), run.run_id):
                return _vm(config, run, progress)
        return Outcome("failed", f"this agent does not run {run.kind} jobs")
    except HozonError as exc:
        return Outcome("failed", exc.message, lines=[f"hint: {exc.hint}"] if exc.hint else [])
    except OSError as exc:
        return Outcome("failed", f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")


@contextmanager
def _repository(config: AgentConfig, run: Assignment) -> Iterator[Repository]:
    backend = RemoteBackend(repository_location(config), config)
    try:
        repo = Repository.open(backend, config.password)
        with Lock(repo, SHARED, f"agent {config.name}, run {run.run_id} of job {run.job}"):
            repo.load_index()
            yield repo
    finally:
        backend.close()


def _tags(run: Assignment) -> list[str]:
    return sorted({*run.spec.get("tags", []), f"job:{run.job}"})


def _files(config: AgentConfig, run: Assignment, progress: Progress) -> Outcome:
    missing = [p for p in run.spec["paths"] if not os.path.lexists(p)]
    if missing:
        return Outcome("failed", f"{', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist on "
                                 f"{config.name}")
    options = BackupOptions(paths=list(run.spec["paths"]), tags=_tags(run), excludes=list(run.spec.get("exclude", [])))
    with _repository(config, run) as repo:
        result = backup_files(repo, options, progress.files)
    outcome = _saved(result.snapshot, [f"warning: {w}" for w in result.warnings])
    if result.warnings:
        named = "; ".join(result.warnings[:MAX_REASON_WARNINGS])
        left = len(result.warnings) - MAX_REASON_WARNINGS
        more = f" (and {left} more)" if left > 0 else ""
        outcome.state = "warning"
        outcome.reason = f"{len(result.warnings)} warning(s), the snapshot lacks what they name: {named}{more}"
    return outcome


def _vm(config: AgentConfig, run: Assignment, progress: Progress) -> Outcome:
    spec = run.spec
    source = LibvirtSource(spec["libvirt"], spec.get("connect")) if spec.get("libvirt") else None
    options = ImageBackupOptions(qmp=spec.get("qmp", ""), name=spec["vm"], mode=spec.get("mode", "auto"),
                                 tags=_tags(run), source=source, checkpoint=run.kind == "checkpoint")
    with _repository(config, run) as repo:
        result = backup_vm(repo, options, progress.image)
    warnings = [n for n in result.notes if n.startswith("WARNING")]
    outcome = _saved(result.snapshot, [f"note: {n}" for n in result.notes])
    if warnings:
        outcome.state, outcome.reason = "warning", warnings[0]
    return outcome


def _saved(snapshot: Snapshot, lines: list[str]) -> Outcome:
    s = snapshot.summary
    lines.append(f"snapshot {snapshot.id} saved: {s.get('bytes_read', 0)} bytes read, "
                 f"{s.get('data_added_stored', 0)} bytes stored")
    return Outcome("succeeded", "", snapshot.id, int(s.get("bytes_read", 0)), int(s.get("data_added_stored", 0)),
                   lines)


class VmGuard:
    """One run per VM at a time on this host's agent: a lock file per VM in the agent directory.

    Held with ``flock`` (it goes when the process dies), so a second run for the same VM, in this
    daemon or in another agent process on the same directory, is refused with the run that holds it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "vm-locks"

    @contextmanager
    def hold(self, vm: str, run_id: int) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        path = self.directory / (re.sub(r"[^A-Za-z0-9._-]", "_", vm) or "_")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another run"
                raise RunRefused(f"VM {vm} is being backed up by {holder} on this agent; one run per VM at a "
                                 "time") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"run {run_id}".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock
