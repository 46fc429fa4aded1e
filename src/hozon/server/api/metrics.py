"""``GET /metrics``: Prometheus text, read from the catalog at each scrape.

It needs a credential like every route: the admin's, or the read-only metrics credential in
``DIR/metrics.token`` (made at the server's first start; give Prometheus that one, as
``authorization: {credentials_file: …}``, so a scraper cannot change anything). Every number comes
from the catalog, so servers sharing one PostgreSQL catalog all report the same values.

    hozon_job_last_success_timestamp_seconds{job,kind,subject}   end of the last run that made a snapshot
    hozon_job_last_run_duration_seconds{job,state}               the last finished run
    hozon_job_last_run_bytes_read / _bytes_stored{job}
    hozon_job_bytes_read_total / _bytes_stored_total{job}        over every run
    hozon_runs_total{job,state}                                  finished runs
    hozon_run_failures_total{job,reason}                         failed runs by their reason
    hozon_runs_active{state}                                     queued and running now
    hozon_agents_connected                                       agents heard from in the last 2 minutes
    hozon_agents_enrolled                                        agents not revoked
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from hozon.server.api.deps import context
from hozon.server.catalog.db import Catalog
from hozon.server.catalog.models import Agent, Job, Run, utcnow
from hozon.server.credentials import digest, matches, new_secret
from hozon.server.jobs import subject
from hozon.server.paths import ServerDir, write_private
from hozon.server.runs import as_utc

router = APIRouter()

CONNECTED_WITHIN = datetime.timedelta(minutes=2)
SUCCESS_STATES = ("succeeded", "warning")


def metrics_digest(server_dir: ServerDir) -> str:
    """The SHA-256 of the metrics credential, which is created on first use."""
    path = server_dir.metrics_token
    if not path.exists():
        write_private(path, new_secret("metrics") + "\n")
    return digest(path.read_text().strip())


class CatalogCollector(Collector):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self.catalog.session() as s:
            jobs = {job.id: job for job in s.scalars(select(Job))}
            last_success = GaugeMetricFamily("hozon_job_last_success_timestamp_seconds",
                                             "When the job's last run that made a snapshot finished (Unix time).",
                                             labels=["job", "kind", "subject"])
            rows = s.execute(select(Run.job_id, func.max(Run.finished)).where(Run.state.in_(SUCCESS_STATES))
                             .group_by(Run.job_id))
            for job_id, finished in rows:
                job, when = jobs[job_id], as_utc(finished)
                if when is not None:
                    last_success.add_metric([job.name, job.kind, subject(job)], when.timestamp())
            yield last_success

            duration = GaugeMetricFamily("hozon_job_last_run_duration_seconds", "How long the job's last run took.",
                                         labels=["job", "state"])
            last_read = GaugeMetricFamily("hozon_job_last_run_bytes_read", "Bytes the job's last run read.",
                                          labels=["job"])
            last_stored = GaugeMetricFamily("hozon_job_last_run_bytes_stored",
                                            "Bytes the job's last run added to the repository.", labels=["job"])
            latest = (select(func.max(Run.id)).where(Run.state.in_(("succeeded", "warning", "failed")))
                      .group_by(Run.job_id))
            for run in s.scalars(select(Run).where(Run.id.in_(latest))):
                name = jobs[run.job_id].name
                started, finished = as_utc(run.started), as_utc(run.finished)
                if started and finished:
                    duration.add_metric([name, run.state], (finished - started).total_seconds())
                last_read.add_metric([name], run.bytes_read)
                last_stored.add_metric([name], run.bytes_stored)
            yield from (duration, last_read, last_stored)

            read_total = CounterMetricFamily("hozon_job_bytes_read", "Bytes read by every run of the job.",
                                             labels=["job"])
            stored_total = CounterMetricFamily("hozon_job_bytes_stored", "Bytes added by every run of the job.",
                                               labels=["job"])
            for job_id, read, stored in s.execute(select(Run.job_id, func.sum(Run.bytes_read),
                                                         func.sum(Run.bytes_stored)).group_by(Run.job_id)):
                read_total.add_metric([jobs[job_id].name], int(read or 0))
                stored_total.add_metric([jobs[job_id].name], int(stored or 0))
            yield from (read_total, stored_total)

            runs_total = CounterMetricFamily("hozon_runs", "Finished runs, by job and outcome.",
                                             labels=["job", "state"])
            now_runs = GaugeMetricFamily("hozon_runs_active", "Runs waiting or under way.", labels=["state"])
            counts = {"queued": 0, "running": 0}
            for job_id, state, count in s.execute(select(Run.job_id, Run.state, func.count())
                                                  .group_by(Run.job_id, Run.state)):
                if state in counts:
                    counts[state] += count
                else:
                    runs_total.add_metric([jobs[job_id].name, state], count)
            for state, count in counts.items():
                now_runs.add_metric([state], count)
            yield runs_total

            failures = CounterMetricFamily("hozon_run_failures", "Failed runs, by job and reason.",
                                           labels=["job", "reason"])
            for job_id, reason, count in s.execute(select(Run.job_id, Run.reason, func.count())
                                                   .where(Run.state == "failed").group_by(Run.job_id, Run.reason)):
                failures.add_metric([jobs[job_id].name, reason], count)
            yield failures

            connected = s.scalar(select(func.count()).select_from(Agent).where(
                Agent.revoked.is_(False), Agent.last_seen >= utcnow() - CONNECTED_WITHIN))
            enrolled = s.scalar(select(func.count()).select_from(Agent).where(Agent.revoked.is_(False)))
        yield GaugeMetricFamily("hozon_agents_connected", "Agents heard from in the last 2 minutes.",
                                value=connected or 0)
        yield GaugeMetricFamily("hozon_agents_enrolled", "Enrolled agents that are not revoked.", value=enrolled or 0)
        yield now_runs


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    ctx = context(request)
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    allowed = (request.app.state.metrics_digest, ctx.admin_digest)
    if scheme.lower() != "bearer" or not secret or not any(matches(secret, d) for d in allowed):
        raise HTTPException(401, "the admin or the metrics credential is required",
                            headers={"WWW-Authenticate": "Bearer"})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(ctx.catalog))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
