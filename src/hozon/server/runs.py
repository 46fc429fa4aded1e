"""Runs and their leases: queued, claimed by one holder, renewed while it works, then finished.

A run is executed by whoever claims it: the job's agent (through ``POST /agent/poll``) or, for
verify and prune, a server process. Claiming is one conditional UPDATE (``… WHERE state = 'queued'``):
on SQLite writes are serialised, so exactly one claimant's UPDATE matches; on PostgreSQL the
candidate row is first taken with ``SELECT … FOR UPDATE SKIP LOCKED``, so servers sharing one
catalog each get a different run and never wait on each other. A job has at most one queued run
(queueing again while one waits returns that run) and at most one running run.

The holder renews its lease (``lease_seconds()``, 60 s; ``HOZON_SERVER_LEASE_SECONDS`` for tests);
a run whose lease lapses is failed with "… stopped reporting", and a holder that comes back is told
its run is over (its later reports are refused with 409).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, and_, exists, insert, literal, select, update
from sqlalchemy.orm import Session, aliased

from hozon.errors import ServerError, UsageError
from hozon.server.catalog.db import Catalog
from hozon.server.catalog.models import Job, Run, RunLog, utcnow

FINAL_STATES = ("succeeded", "warning", "failed")
MAX_REASON = 1000
MAX_LOG_LINE = 4000

log = logging.getLogger("hozon.server")


def lease_seconds() -> float:
    """How long a holder may stay silent before its run is failed (``HOZON_SERVER_LEASE_SECONDS``)."""
    return float(os.environ.get("HOZON_SERVER_LEASE_SECONDS", "60"))


def as_utc(when: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite hands back naive datetimes; every time in the catalog is UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=datetime.UTC)


def iso(when: datetime.datetime | None) -> str | None:
    """A catalog time as ISO 8601 with its UTC offset (None stays None)."""
    when = as_utc(when)
    return when.isoformat() if when else None


def one_line(text: str, limit: int = MAX_REASON) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def changed(s: Session, statement: Executable) -> int:
    """Run an INSERT or UPDATE; how many rows it touched (what makes it a conditional claim)."""
    return cast(CursorResult[Any], s.execute(statement)).rowcount


# -- queueing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queued:
    run_id: int
    new: bool  # False: a run of this job was already waiting, and that one is returned


def queue_run(s: Session, job: Job, trigger: str) -> Queued:
    """Queue a run of ``job`` unless one is already waiting (one INSERT … WHERE NOT EXISTS)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(Job.id).where(Job.id == job.id).with_for_update())  # queueing of one job in turn
    waiting = select(Run.id).where(Run.job_id == job.id, Run.state == "queued")
    now = utcnow()
    new_id = s.scalars(
        insert(Run).from_select(
            ["job_id", "state", "trigger", "queued_at", "reason", "bytes_read", "bytes_stored", "progress"],
            select(literal(job.id), literal("queued"), literal(trigger), literal(now, Run.queued_at.type),
                   literal(""), literal(0), literal(0), literal({}, Run.progress.type))
            .where(~exists(waiting)),
        ).returning(Run.id)
    ).first()
    if new_id is not None:
        add_log(s, new_id, f"queued ({trigger})")
        return Queued(new_id, True)
    existing = s.scalars(waiting).first()
    assert existing is not None
    return Queued(existing, False)


# -- claiming and leases --------------------------------------------------------------------------
def claim_next(catalog: Catalog, owner: str, agent_id: int | None) -> int | None:
    """Claim the oldest queued run for ``agent_id`` (None: the server's own kinds); its id, or None."""
    other = aliased(Run)
    running_sibling = exists().where(other.job_id == Run.job_id, other.state == "running")
    mine = Job.agent_id == agent_id if agent_id is not None else Job.agent_id.is_(None)
    with catalog.session() as s:
        candidates = (select(Run.id).join(Job, Job.id == Run.job_id)
                      .where(Run.state == "queued", mine, ~running_sibling).order_by(Run.id))
        if catalog.is_postgresql:
            candidates = candidates.limit(1).with_for_update(of=Run, skip_locked=True)
        else:
            candidates = candidates.limit(8)
        for run_id in s.scalars(candidates).all():
            now = utcnow()
            claim = (update(Run).where(Run.id == run_id, Run.state == "queued", ~running_sibling)
                     .values(state="running", started=now, lease_owner=owner,
                             lease_expires=now + datetime.timedelta(seconds=lease_seconds()))
                     .execution_options(synchronize_session=False))
            claimed = changed(s, claim)
            if claimed == 1:
                add_log(s, run_id, f"claimed by {describe_owner(owner)}")
                return run_id
    return None


def describe_owner(owner: str) -> str:
    """``agent:web1`` → "agent web1"; ``server:HOST:PID`` → "server process HOST:PID"."""
    kind, _, name = owner.partition(":")
    return f"agent {name}" if kind == "agent" else f"server process {name}"


def renew(s: Session, run_id: int, owner: str, progress: dict[str, Any] | None = None) -> datetime.datetime:
    """Extend the lease of a run ``owner`` holds (and store its progress); 409 if it is over."""
    expires = utcnow() + datetime.timedelta(seconds=lease_seconds())
    values: dict[str, Any] = {"lease_expires": expires}
    if progress is not None:
        values["progress"] = progress
        for key in ("bytes_read", "bytes_stored"):
            if isinstance(progress.get(key), int):
                values[key] = progress[key]
    done = changed(s, update(Run).where(Run.id == run_id, Run.state == "running", Run.lease_owner == owner)
                     .values(**values).execution_options(synchronize_session=False))
    if done != 1:
        raise _over(s, run_id)
    return expires


def finish(s: Session, run_id: int, owner: str, state: str, reason: str = "", snapshot_id: str | None = None,
           bytes_read: int | None = None, bytes_stored: int | None = None) -> None:
    """Record how a run ended; only its holder may, and only once (409 afterwards)."""
    if state not in FINAL_STATES:
        raise UsageError(f"{state!r} is not a final state", hint=f"states are {', '.join(FINAL_STATES)}")
    reason = one_line(reason)
    if state != "succeeded" and not reason:
        reason = f"{describe_owner(owner)} gave no reason"
    values: dict[str, Any] = {"state": state, "reason": reason, "finished": utcnow(), "lease_expires": None,
                              "snapshot_id": snapshot_id}
    if bytes_read is not None:
        values["bytes_read"] = bytes_read
    if bytes_stored is not None:
        values["bytes_stored"] = bytes_stored
    done = changed(s, update(Run).where(Run.id == run_id, Run.state == "running", Run.lease_owner == owner)
                     .values(**values).execution_options(synchronize_session=False))
    if done != 1:
        raise _over(s, run_id)
    add_log(s, run_id, f"{state}{': ' + reason if reason else ''}")


def _over(s: Session, run_id: int) -> ServerError:
    run = s.get(Run, run_id)
    if run is None:
        return ServerError(f"no run {run_id}", status=404)
    s.refresh(run)
    why = f" ({run.reason})" if run.reason else ""
    return ServerError(f"run {run_id} is no longer held by this client: it is {run.state}{why}", status=409)


def expire_leases(catalog: Catalog) -> list[int]:
    """Fail every running run whose lease has lapsed; the ids failed."""
    failed: list[int] = []
    with catalog.session() as s:
        now = utcnow()
        lapsed = s.execute(select(Run.id, Run.lease_owner)
                           .where(Run.state == "running", Run.lease_expires < now)).all()
        for run_id, owner in lapsed:
            reason = f"{describe_owner(owner or '')} stopped reporting (its lease of {lease_seconds():g} s lapsed)"
            done = changed(s, update(Run).where(and_(Run.id == run_id, Run.state == "running",
                                                    Run.lease_expires < now))
                             .values(state="failed", reason=reason, finished=now, lease_expires=None)
                             .execution_options(synchronize_session=False))
            if done == 1:
                add_log(s, run_id, f"failed: {reason}")
                failed.append(run_id)
    return failed


# -- logs and views -------------------------------------------------------------------------------
def add_log(s: Session, run_id: int, *lines: str) -> None:
    """Lines of a run's log, kept in the catalog and written to the server's log too (server/logs.py)."""
    now = utcnow()
    for line in lines:
        log.info(line, extra={"run": run_id})
    s.execute(insert(RunLog), [{"run_id": run_id, "at": now, "line": line[:MAX_LOG_LINE]} for line in lines])


def run_doc(run: Run) -> dict[str, Any]:
    """The JSON shape of a run (API, ``job runs --json``)."""
    started, finished = as_utc(run.started), as_utc(run.finished)
    return {
        "id": run.id, "job": run.job.name, "kind": run.job.kind, "state": run.state, "trigger": run.trigger,
        "queued_at": iso(run.queued_at), "started": iso(started), "finished": iso(finished),
        "duration": (finished - started).total_seconds() if started and finished else None,
        "reason": run.reason, "bytes_read": run.bytes_read, "bytes_stored": run.bytes_stored,
        "snapshot_id": run.snapshot_id, "holder": describe_owner(run.lease_owner) if run.lease_owner else None,
        "lease_expires": iso(run.lease_expires), "progress": run.progress,
    }
