"""Work the server does on its own repositories: verify and prune runs, and each job's retention.

The server opens a namespace's repository itself (``DIR/datastore/NS`` with ``DIR/keys/NS.password``)
and uses the same library code as ``hozon check``, ``prune`` and ``forget``, under the same locks, so
agents may keep backing up meanwhile. A verify or prune run is claimed like any run; a keeper
thread renews its lease while the work goes on.

Retention follows every agent run that made a snapshot (succeeded, or warning: a snapshot with
warnings still counts): the snapshot is recorded in the catalog, then the job's policy is applied
to the job's own snapshots only (those the catalog ties to its runs), never to anything else in
the namespace. If the server stops before it is done, the job's next run applies it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select

from hozon.errors import HozonError, ServerError
from hozon.repo.check import DataSubset, check_repository
from hozon.repo.locks import PRUNE, SHARED, Lock
from hozon.repo.prune import DEFAULT_REPACK_THRESHOLD, execute_prune, plan_prune
from hozon.repo.repository import Repository
from hozon.repo.retention import apply_retention
from hozon.server.catalog.models import Run, SnapshotRecord
from hozon.server.context import ServerContext
from hozon.server.jobs import retention_policy
from hozon.server.runs import add_log, finish, lease_seconds, one_line, renew
from hozon.server.storage import open_repository

log = logging.getLogger("hozon.server")

MAX_LOGGED_PROBLEMS = 200


@dataclass
class Outcome:
    state: str
    reason: str = ""
    bytes_read: int = 0
    lines: list[str] = field(default_factory=list)


def verify(repo: Repository, spec: dict[str, Any]) -> Outcome:
    """``hozon check --read-data[-subset]`` on the namespace's repository."""
    subset = DataSubset.parse(str(spec["subset"])) if spec.get("subset") else None
    with Lock(repo, SHARED, "verify"):
        result = check_repository(repo, read_data=True, subset=subset)
    lines = [f"error: {e}" for e in result.errors[:MAX_LOGGED_PROBLEMS]]
    lines += [f"note: {n}" for n in result.notes[:MAX_LOGGED_PROBLEMS]]
    lines.append(f"checked {result.index_files} index file(s), {result.packs} pack(s), {result.snapshots} "
                 f"snapshot(s); read {result.packs_read} pack(s), {result.bytes_read} bytes"
                 + (f" (subset {subset.describe()})" if subset else ""))
    if result.ok:
        return Outcome("succeeded", "", result.bytes_read, lines)
    reason = f"verify found {len(result.errors)} error(s), the first: {result.errors[0]}"
    return Outcome("failed", one_line(reason), result.bytes_read, lines)


def prune(repo: Repository, spec: dict[str, Any]) -> Outcome:
    """``hozon prune`` on the namespace's repository (safe while agents back up into it)."""
    with Lock(repo, PRUNE, "prune"):
        plan = plan_prune(repo, float(spec.get("repack_threshold", DEFAULT_REPACK_THRESHOLD)))
        result = execute_prune(repo, plan)
    lines = [f"plan: {json.dumps(plan.summary())}", f"result: {json.dumps(result.summary())}",
             f"deleted {result.packs_deleted} pack(s), {result.bytes_freed} bytes freed"]
    return Outcome("succeeded", "", 0, lines)


SERVER_WORK = {"verify": verify, "prune": prune}


class Maintenance:
    """A few worker threads for the server's own runs and for retention after agent runs."""

    def __init__(self, ctx: ServerContext, workers: int = 2) -> None:
        self.ctx = ctx
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hozon-maintenance")
        self._busy = 0
        self._mutex = threading.Lock()

    def has_room(self) -> bool:
        with self._mutex:
            return self._busy < self.workers

    def execute(self, run_id: int) -> None:
        """Carry out a verify or prune run this process has claimed."""
        self._submit(self._execute, run_id)

    def after_run(self, run_id: int) -> None:
        """Record the snapshot an agent run made and apply its job's retention."""
        self._submit(self._retention, run_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, work: Any, run_id: int) -> None:
        with self._mutex:
            self._busy += 1

        def task() -> None:
            try:
                work(run_id)
            except Exception:  # a worker thread must never die silently
                log.exception("maintenance of run %s failed", run_id)
            finally:
                with self._mutex:
                    self._busy -= 1

        self._pool.submit(task)

    # -- verify and prune runs --------------------------------------------------------------------
    def _execute(self, run_id: int) -> None:
        with self.ctx.catalog.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            kind, namespace, spec = run.job.kind, run.job.namespace.name, dict(run.job.spec)
        owner = self.ctx.identity
        try:
            with self._lease(run_id):
                outcome = SERVER_WORK[kind](open_repository(self.ctx.server_dir, namespace), spec)
        except HozonError as exc:
            outcome = Outcome("failed", one_line(exc.message))
        except Exception as exc:
            log.exception("%s run %s", kind, run_id)
            outcome = Outcome("failed", one_line(f"internal error: {exc!r}"))
        try:
            with self.ctx.catalog.session() as s:
                if outcome.lines:
                    add_log(s, run_id, *outcome.lines)
                finish(s, run_id, owner, outcome.state, outcome.reason, bytes_read=outcome.bytes_read)
        except ServerError as exc:
            log.warning("run %s: %s", run_id, exc.message)

    @contextmanager
    def _lease(self, run_id: int) -> Iterator[None]:
        """Renew the lease of a run this process works on until the block ends."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(lease_seconds() / 3):
                try:
                    with self.ctx.catalog.session() as s:
                        renew(s, run_id, self.ctx.identity)
                except ServerError as exc:
                    log.warning("run %s: %s", run_id, exc.message)
                    return
                except Exception:
                    log.exception("renewing the lease of run %s", run_id)  # the next try may work

        keeper = threading.Thread(target=keep, name=f"hozon-lease-{run_id}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    # -- retention --------------------------------------------------------------------------------
    def _retention(self, run_id: int) -> None:
        with self.ctx.catalog.session() as s:
            run = s.get(Run, run_id)
            assert run is not None and run.snapshot_id
            job_id, namespace_id, snapshot_id = run.job_id, run.job.namespace_id, run.snapshot_id
            namespace, policy_doc = run.job.namespace.name, dict(run.job.retention)
        try:
            repo = open_repository(self.ctx.server_dir, namespace)
            snap = repo.load_snapshot(snapshot_id)
            with self.ctx.catalog.session() as s:
                known = select(SnapshotRecord.id).where(SnapshotRecord.snapshot_id == snapshot_id,
                                                        SnapshotRecord.namespace_id == namespace_id)
                if s.scalars(known).first() is None:
                    s.add(SnapshotRecord(snapshot_id=snapshot_id, namespace_id=namespace_id, run_id=run_id,
                                         kind=snap.kind, subject=", ".join(snap.paths)[:1024],
                                         time=snap.datetime))
            if not policy_doc:
                return
            policy = retention_policy(policy_doc)
            with self.ctx.catalog.session() as s:
                ids = set(s.scalars(select(SnapshotRecord.snapshot_id).join(Run, Run.id == SnapshotRecord.run_id)
                                    .where(Run.job_id == job_id, SnapshotRecord.namespace_id == namespace_id)))
            with Lock(repo, PRUNE, "forget"):
                present = ids & set(repo.snapshot_ids())
                decisions = apply_retention([repo.load_snapshot(i) for i in sorted(present)], policy)
                removed = [d.snapshot.id for d in decisions if not d.keep]
                for gone in removed:
                    repo.delete_snapshot(gone)
            with self.ctx.catalog.session() as s:
                dropped = sorted((ids - present) | set(removed))
                if dropped:
                    s.execute(delete(SnapshotRecord).where(SnapshotRecord.namespace_id == namespace_id,
                                                           SnapshotRecord.snapshot_id.in_(dropped)))
                add_log(s, run_id, f"retention: kept {len(decisions) - len(removed)} snapshot(s) of this job, "
                                   f"removed {len(removed)}" + (f": {' '.join(removed)}" if removed else ""))
        except HozonError as exc:
            with self.ctx.catalog.session() as s:
                add_log(s, run_id, f"retention not applied: {exc.message} (the job's next run applies it)")
