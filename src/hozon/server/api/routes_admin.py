"""Admin routes for jobs and runs (``hozon job …``); every one needs the admin credential."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from hozon.errors import ServerError
from hozon.server.api.deps import Principal, context, principal
from hozon.server.catalog.models import JOB_KINDS, Job, Run, RunLog
from hozon.server.context import ServerContext
from hozon.server.jobs import JobDefinition, add_job, find_job, subject
from hozon.server.runs import iso, queue_run, run_doc

router = APIRouter(prefix="/api/v1")


def admin(who: Principal = Depends(principal)) -> Principal:
    who.require_admin()
    return who


class JobIn(BaseModel):
    name: str
    kind: str = Field(description=f"one of {', '.join(JOB_KINDS)}")
    agent: str | None = None
    namespace: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    schedule: str | None = None
    retention: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


def job_doc(job: Job, last: Run | None) -> dict[str, Any]:
    """The JSON shape of a job (API, ``job list --json``)."""
    return {
        "name": job.name, "kind": job.kind, "agent": job.agent.name if job.agent else None,
        "namespace": job.namespace.name, "subject": subject(job), "spec": job.spec, "schedule": job.schedule,
        "retention": job.retention, "enabled": job.enabled, "next_run": iso(job.next_run),
        "last_run": run_doc(last) if last else None,
    }


@router.post("/jobs", status_code=201)
def create_job(body: JobIn, _: Principal = Depends(admin), ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        job = add_job(s, JobDefinition(**body.model_dump()))
        return job_doc(job, None)


@router.get("/jobs")
def list_jobs(_: Principal = Depends(admin), ctx: ServerContext = Depends(context)) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        latest = select(Run.job_id, func.max(Run.id).label("run_id")).group_by(Run.job_id).subquery()
        rows = s.execute(select(Job, Run).outerjoin(latest, latest.c.job_id == Job.id)
                         .outerjoin(Run, Run.id == latest.c.run_id).order_by(Job.name)).all()
        return [job_doc(job, last) for job, last in rows]


@router.get("/jobs/{name}")
def get_job(name: str, _: Principal = Depends(admin), ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        job = find_job(s, name)
        last = s.scalars(select(Run).where(Run.job_id == job.id).order_by(Run.id.desc()).limit(1)).first()
        return job_doc(job, last)


@router.post("/jobs/{name}/runs", status_code=201)
def run_job(name: str, _: Principal = Depends(admin), ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Queue a run now; if one is already waiting, that run is returned (``"new": false``)."""
    with ctx.catalog.session() as s:
        queued = queue_run(s, find_job(s, name), "manual")
    with ctx.catalog.session() as s:
        run = s.get(Run, queued.run_id)
        assert run is not None
        return {**run_doc(run), "new": queued.new}


@router.get("/runs")
def list_runs(job: str | None = None, limit: int = Query(50, ge=1, le=10_000), _: Principal = Depends(admin),
              ctx: ServerContext = Depends(context)) -> list[dict[str, Any]]:
    """The newest runs first (of one job with ``?job=NAME``)."""
    with ctx.catalog.session() as s:
        query = select(Run).options(joinedload(Run.job)).order_by(Run.id.desc()).limit(limit)
        if job is not None:
            query = query.where(Run.job_id == find_job(s, job).id)
        return [run_doc(r) for r in s.scalars(query)]


@router.get("/runs/{run_id}")
def get_run(run_id: int, _: Principal = Depends(admin), ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    with ctx.catalog.session() as s:
        return run_doc(_run(s, run_id))


@router.get("/runs/{run_id}/log")
def get_run_log(run_id: int, _: Principal = Depends(admin),
                ctx: ServerContext = Depends(context)) -> list[dict[str, Any]]:
    with ctx.catalog.session() as s:
        _run(s, run_id)
        lines = s.scalars(select(RunLog).where(RunLog.run_id == run_id).order_by(RunLog.id))
        return [{"at": iso(line.at), "line": line.line} for line in lines]


def _run(s: Session, run_id: int) -> Run:
    run: Run | None = s.get(Run, run_id)
    if run is None:
        raise ServerError(f"no run {run_id}", status=404, hint="list them with: hozon job runs")
    return run
