"""The scheduler thread of ``server run``: queue due runs, fail lapsed leases, start server runs.

Every tick (``HOZON_SERVER_TICK_SECONDS``, 2 s) it

- fails running runs whose holder stopped renewing its lease (``runs.expire_leases``);
- queues a run of every enabled job whose ``next_run`` has come, moving ``next_run`` to the
  schedule's next time in the same transaction with ``UPDATE … WHERE next_run = <the value read>``,
  so when several servers share one catalog only one of them queues it (on PostgreSQL the due jobs
  are also read ``FOR UPDATE SKIP LOCKED``, so the others pass over them at once). A server that was
  down for a while queues one run per job, not one per missed time;
- claims verify and prune runs while its maintenance workers have room, and hands them over.
"""

from __future__ import annotations

import logging
import os
import threading

from sqlalchemy import select, update

from hozon.server.catalog.models import Job, utcnow
from hozon.server.context import ServerContext
from hozon.server.jobs import next_time
from hozon.server.maintenance import Maintenance
from hozon.server.runs import as_utc, changed, claim_next, expire_leases, queue_run

log = logging.getLogger("hozon.server")


def tick_seconds() -> float:
    return float(os.environ.get("HOZON_SERVER_TICK_SECONDS", "2"))


def queue_due(ctx: ServerContext) -> list[int]:
    """Queue a run of every job that is due; the ids of the runs queued."""
    queued: list[int] = []
    with ctx.catalog.session() as s:
        now = utcnow()
        due = select(Job).where(Job.enabled, Job.schedule.is_not(None), Job.next_run <= now).order_by(Job.id)
        if ctx.catalog.is_postgresql:
            due = due.with_for_update(skip_locked=True)
        for job in s.scalars(due).all():
            assert job.schedule is not None
            moved = changed(s, update(Job).where(Job.id == job.id, Job.next_run == job.next_run)
                              .values(next_run=next_time(job.schedule, now))
                              .execution_options(synchronize_session=False))
            if moved == 1:
                queued.append(queue_run(s, job, "schedule").run_id)
                log.info("queued run of %s due at %s", job.name, as_utc(job.next_run))
    return queued


class Scheduler:
    """Runs ``tick`` on a daemon thread until ``stop``."""

    def __init__(self, ctx: ServerContext, maintenance: Maintenance) -> None:
        self.ctx = ctx
        self.maintenance = maintenance
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hozon-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def tick(self) -> None:
        expire_leases(self.ctx.catalog)
        queue_due(self.ctx)
        while self.maintenance.has_room():
            run_id = claim_next(self.ctx.catalog, self.ctx.identity, agent_id=None)
            if run_id is None:
                break
            self.maintenance.execute(run_id)

    def _loop(self) -> None:
        while not self._stop.wait(tick_seconds()):
            try:
                self.tick()
            except Exception:  # the catalog may be briefly unreachable: try again next tick
                log.exception("scheduler tick failed")
