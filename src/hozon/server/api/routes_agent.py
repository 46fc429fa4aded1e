"""The agent protocol, server side: take a run (long poll), report progress and log lines, finish.

Every route needs an agent credential, and an agent sees only runs of its own jobs (403 otherwise,
before anything is read or changed). Progress renews the run's lease; a run whose lease lapsed, or
that is already finished, refuses further reports with 409, which tells the agent to stop.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from hozon.repo.backends.local import LocalBackend
from hozon.server.api.deps import Principal, context, principal
from hozon.server.catalog.models import Run
from hozon.server.context import ServerContext
from hozon.server.maintenance import Maintenance
from hozon.server.runs import add_log, claim_next, finish, iso, lease_seconds, renew

router = APIRouter(prefix="/api/v1/agent")

MAX_WAIT = 25.0  # seconds a poll may be held open
POLL_INTERVAL = 1.0  # how often a held poll looks for a run again
SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")


def agent(who: Principal = Depends(principal)) -> Principal:
    if who.kind != "agent":
        raise HTTPException(403, "this needs an agent credential")
    return who


def owner(who: Principal) -> str:
    """The lease holder's name for an agent (agent names are unique)."""
    return f"agent:{who.name}"


class PollIn(BaseModel):
    wait: float = Field(MAX_WAIT, ge=0, description="seconds to hold the request open when no run is waiting")


class ProgressIn(BaseModel):
    bytes_read: int | None = Field(None, ge=0)
    bytes_stored: int | None = Field(None, ge=0)
    rate: float | None = Field(None, ge=0, description="bytes read per second, lately")
    current: str | None = Field(None, max_length=4096, description="what is being read now")


class LogIn(BaseModel):
    lines: list[str] = Field(max_length=1000)


class FinishIn(BaseModel):
    state: Literal["succeeded", "warning", "failed"]
    reason: str = ""
    snapshot_id: str | None = None
    bytes_read: int | None = Field(None, ge=0)
    bytes_stored: int | None = Field(None, ge=0)


def _held_run(s: Session, run_id: int, who: Principal) -> Run:
    """The run, if it is this agent's and it still holds it: 404, 403 or 409 otherwise."""
    run = s.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    if run.job.agent_id != who.agent_id:
        raise HTTPException(403, f"run {run_id} belongs to another agent")
    if run.state != "running" or run.lease_owner != owner(who):
        why = f" ({run.reason})" if run.reason else ""
        raise HTTPException(409, f"run {run_id} is no longer held by this agent: it is {run.state}{why}")
    return run


def _assignment(ctx: ServerContext, run_id: int) -> dict[str, Any]:
    """What a polling agent receives: the run and everything it needs to carry it out."""
    with ctx.catalog.session() as s:
        run = s.get(Run, run_id)
        assert run is not None
        job = run.job
        return {"id": run.id, "trigger": run.trigger, "queued_at": iso(run.queued_at),
                "lease_seconds": lease_seconds(),
                "job": {"name": job.name, "kind": job.kind, "namespace": job.namespace.name, "spec": job.spec}}


@router.post("/poll", responses={200: {"description": "a run to carry out"}, 204: {"description": "no run"}})
async def poll(request: Request, body: PollIn | None = None, who: Principal = Depends(agent),
               ctx: ServerContext = Depends(context)) -> Response:
    """Take the oldest queued run of this agent's jobs, waiting up to ``wait`` (at most 25) seconds."""
    deadline = time.monotonic() + min(body.wait if body else MAX_WAIT, MAX_WAIT)
    while True:
        run_id = await run_in_threadpool(claim_next, ctx.catalog, owner(who), who.agent_id)
        if run_id is not None:
            doc = await run_in_threadpool(_assignment, ctx, run_id)
            return JSONResponse(doc)
        left = deadline - time.monotonic()
        if left <= 0 or await request.is_disconnected():
            return Response(status_code=204)
        await asyncio.sleep(min(POLL_INTERVAL, left))


@router.post("/runs/{run_id}/progress")
def progress(run_id: int, body: ProgressIn, who: Principal = Depends(agent),
             ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Store how far the run is, and renew its lease."""
    with ctx.catalog.session() as s:
        _held_run(s, run_id, who)
        expires = renew(s, run_id, owner(who), body.model_dump(exclude_none=True))
    return {"lease_expires": iso(expires)}


@router.post("/runs/{run_id}/log", status_code=204)
def log_lines(run_id: int, body: LogIn, who: Principal = Depends(agent),
              ctx: ServerContext = Depends(context)) -> None:
    with ctx.catalog.session() as s:
        _held_run(s, run_id, who)
        if body.lines:
            add_log(s, run_id, *body.lines)


@router.post("/runs/{run_id}/finish")
def finish_run(run_id: int, body: FinishIn, request: Request, who: Principal = Depends(agent),
               ctx: ServerContext = Depends(context)) -> dict[str, Any]:
    """Record the outcome; a snapshot it names must be in the namespace's repository already."""
    with ctx.catalog.session() as s:
        run = _held_run(s, run_id, who)
        namespace = run.job.namespace.name
        if body.snapshot_id is not None:
            if not SNAPSHOT_ID.fullmatch(body.snapshot_id):
                raise HTTPException(422, f"{body.snapshot_id!r} is not a snapshot id")
            if not LocalBackend(ctx.server_dir.repository(namespace)).exists(f"snapshots/{body.snapshot_id}"):
                raise HTTPException(422, f"snapshot {body.snapshot_id[:16]} is not in namespace {namespace}'s "
                                         f"repository")
        elif body.state == "succeeded":
            raise HTTPException(422, "a run that succeeded names the snapshot it made")
        finish(s, run_id, owner(who), body.state, body.reason, body.snapshot_id, body.bytes_read, body.bytes_stored)
    if body.snapshot_id and body.state != "failed":
        maintenance: Maintenance = request.app.state.maintenance
        maintenance.after_run(run_id)
    with ctx.catalog.session() as s:
        done = s.get(Run, run_id)
        assert done is not None
        return {"id": run_id, "state": done.state, "reason": done.reason}
