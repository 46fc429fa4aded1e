"""Jobs: what to back up (or verify, or prune), who runs it, when, and which snapshots to keep.

A job of kind ``files``, ``vm`` or ``checkpoint`` runs on one agent and writes into that agent's
namespace; ``verify`` and ``prune`` run on the server itself over one namespace's repository. The
``spec`` is the kind's parameters (what the agent passes to the backup code); ``schedule`` is a
cron expression in the server's local time (a disabled job is not scheduled, but ``job run`` still
runs it); ``retention`` is a ``forget`` policy applied to the job's own snapshots after each run
that made one. Everything a user can get wrong is refused here, at ``job add``, in one sentence.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from hozon.errors import ServerError, UsageError
from hozon.repo.check import DataSubset
from hozon.repo.retention import Duration, Retention
from hozon.server.catalog.models import JOB_KINDS, Agent, Job, Namespace, utcnow
from hozon.server.paths import check_namespace

AGENT_KINDS = ("files", "vm", "checkpoint")
SERVER_KINDS = ("verify", "prune")
RETENTION_COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
JOB_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

# What each kind's spec may hold, and which keys it needs.
_SPEC_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "files": ({"paths", "exclude", "tags"}, {"paths"}),
    "vm": ({"vm", "qmp", "libvirt", "connect", "mode", "tags"}, {"vm"}),
    "checkpoint": ({"vm", "qmp", "libvirt", "connect", "tags"}, {"vm"}),
    "verify": ({"subset"}, set()),
    "prune": ({"repack_threshold"}, set()),
}


@dataclass(frozen=True)
class JobDefinition:
    """What ``job add`` asks for; ``agent`` for agent kinds, ``namespace`` for server kinds."""

    name: str
    kind: str
    agent: str | None = None
    namespace: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    schedule: str | None = None
    retention: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True


def check_schedule(expression: str) -> str:
    """A cron expression croniter accepts (five fields, or six with seconds)."""
    expression = " ".join(expression.split())
    if not croniter.is_valid(expression):
        raise UsageError(f"schedule {expression!r} is not a valid cron expression",
                         hint="five fields: minute hour day-of-month month day-of-week, e.g. '30 2 * * *'")
    return expression


def next_time(expression: str, after: datetime.datetime) -> datetime.datetime:
    """The first time after ``after`` the schedule names, in UTC; the fields are local time."""
    local = after.astimezone()  # the server's zone at this moment (re-read each time: DST moves it)
    nxt: datetime.datetime = croniter(expression, local).get_next(datetime.datetime)
    return nxt.astimezone(datetime.UTC)


def retention_policy(doc: dict[str, Any]) -> Retention:
    """The ``Retention`` a job's JSON policy stands for ({"last": 3, "daily": 7, "within": "14d"})."""
    unknown = set(doc) - {*RETENTION_COUNTS, "within"}
    if unknown:
        raise UsageError(f"unknown retention rule(s): {', '.join(sorted(unknown))}",
                         hint=f"rules are {', '.join(RETENTION_COUNTS)} and within")
    counts: dict[str, Any] = {}
    for key in RETENTION_COUNTS:
        value = doc.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UsageError(f"retention rule {key} must be a whole number of 0 or more, not {value!r}")
        counts[key] = value
    within = Duration.parse(str(doc["within"])) if doc.get("within") else Duration()
    return Retention(**counts, within=within)


def _check_spec(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    allowed, required = _SPEC_KEYS[kind]
    extra = set(spec) - allowed
    if extra:
        raise UsageError(f"a {kind} job takes no {', '.join(sorted(extra))}")
    missing = required - {k for k, v in spec.items() if v}
    if missing:
        raise UsageError(f"a {kind} job needs {', '.join(sorted(missing))}")
    if kind == "files" and not (isinstance(spec["paths"], list) and all(isinstance(p, str) and p.startswith("/")
                                                                         for p in spec["paths"])):
        raise UsageError("the paths of a files job must be absolute paths on the agent's host")
    if kind in ("vm", "checkpoint") and bool(spec.get("qmp")) == bool(spec.get("libvirt")):
        raise UsageError(f"a {kind} job needs exactly one of --qmp SOCKET and --libvirt DOMAIN")
    if kind == "vm" and spec.get("mode", "auto") not in ("auto", "full", "incremental"):
        raise UsageError(f"mode {spec['mode']!r} is not auto, full or incremental")
    if kind == "verify" and spec.get("subset"):
        DataSubset.parse(str(spec["subset"]))
    if kind == "prune" and "repack_threshold" in spec:
        threshold = spec["repack_threshold"]
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise UsageError(f"repack_threshold must be between 0 and 1, not {threshold!r}")
    return {k: v for k, v in spec.items() if v not in (None, [], "")}


def add_job(s: Session, d: JobDefinition) -> Job:
    """Create a job after checking every part of it; the first run is due at the next schedule time."""
    if not d.name or len(d.name) > 128 or not set(d.name) <= JOB_NAME_CHARS:
        raise UsageError(f"{d.name!r} is not a valid job name", hint="use letters, digits, '.', '_' and '-'")
    if d.kind not in JOB_KINDS:
        raise UsageError(f"{d.kind!r} is not a job kind", hint=f"kinds are {', '.join(JOB_KINDS)}")
    if s.scalars(select(Job.id).where(Job.name == d.name)).first() is not None:
        raise ServerError(f"a job named {d.name} already exists", status=409)
    spec = _check_spec(d.kind, d.spec)
    schedule = check_schedule(d.schedule) if d.schedule else None
    policy = retention_policy(d.retention)
    agent: Agent | None = None
    if d.kind in AGENT_KINDS:
        if not d.agent:
            raise UsageError(f"a {d.kind} job runs on an agent: name it with --agent")
        agent = s.scalars(select(Agent).where(Agent.name == d.agent)).one_or_none()
        if agent is None or agent.revoked:
            raise ServerError(f"no enrolled agent is named {d.agent}", status=404, hint="list them with: hozon agents")
        namespace = agent.namespace
    else:
        if d.agent:
            raise UsageError(f"a {d.kind} job runs on the server, not on an agent")
        if not policy.empty:
            raise UsageError(f"a {d.kind} job makes no snapshots: it takes no retention policy")
        namespace = namespace_row(s, check_namespace(d.namespace or ""))
    if d.retention and policy.empty:  # no policy at all keeps every snapshot; an empty one would keep none
        raise UsageError("this retention policy keeps nothing: it would remove every snapshot the job makes")
    job = Job(name=d.name, kind=d.kind, agent=agent, namespace=namespace, spec=spec, schedule=schedule,
              retention={k: v for k, v in d.retention.items() if v}, enabled=d.enabled,
              next_run=next_time(schedule, utcnow()) if schedule else None)
    s.add(job)
    s.flush()
    return job


def namespace_row(s: Session, name: str) -> Namespace:
    """The catalog row of a namespace, created on first use."""
    row = s.scalars(select(Namespace).where(Namespace.name == name)).one_or_none()
    if row is None:
        row = Namespace(name=name)
        s.add(row)
        s.flush()
    return row


def find_job(s: Session, name: str) -> Job:
    job = s.scalars(select(Job).where(Job.name == name)).one_or_none()
    if job is None:
        raise ServerError(f"no job is named {name}", status=404, hint="list them with: hozon job list")
    return job


def subject(job: Job) -> str:
    """What the job backs up, in a few words (metrics label, listings)."""
    spec = job.spec
    if job.kind == "files":
        return ", ".join(spec.get("paths", []))
    if job.kind in ("vm", "checkpoint"):
        return str(spec.get("vm", ""))
    return job.namespace.name
