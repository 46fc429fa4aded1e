"""The catalog's tables, as SQLAlchemy 2 typed models (the first migration creates exactly these)."""

from __future__ import annotations

import datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

RUN_STATES = ("queued", "running", "succeeded", "warning", "failed")
JOB_KINDS = ("files", "vm", "checkpoint", "verify", "prune")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime.datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Namespace(Base):
    __tablename__ = "namespaces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    enrolled: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime.datetime | None] = mapped_column(default=None)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    namespace: Mapped[Namespace] = relationship()


class EnrolmentToken(Base):
    __tablename__ = "enrolment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    created: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime.datetime]
    used_by: Mapped[int | None] = mapped_column(ForeignKey("agents.id"), default=None)
    namespace: Mapped[Namespace] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # JOB_KINDS
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id"), default=None)  # None: runs on the server
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what to back up and how (kind-specific)
    schedule: Mapped[str | None] = mapped_column(String(128), default=None)  # cron expression
    retention: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"daily": 7, …}
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_run: Mapped[datetime.datetime | None] = mapped_column(default=None)
    created: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    agent: Mapped[Agent | None] = relationship()
    namespace: Mapped[Namespace] = relationship()


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # RUN_STATES
    trigger: Mapped[str] = mapped_column(String(16), default="manual")  # manual | schedule
    queued_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    started: Mapped[datetime.datetime | None] = mapped_column(default=None)
    finished: Mapped[datetime.datetime | None] = mapped_column(default=None)
    reason: Mapped[str] = mapped_column(Text, default="")  # one line: why it failed or warned
    bytes_read: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_stored: Mapped[int] = mapped_column(BigInteger, default=0)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)  # agent or server process
    lease_expires: Mapped[datetime.datetime | None] = mapped_column(default=None)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job: Mapped[Job] = relationship()


class RunLog(Base):
    __tablename__ = "run_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    at: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    line: Mapped[str] = mapped_column(Text)


class SnapshotRecord(Base):
    __tablename__ = "snapshots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    snapshot_id: Mapped[str] = mapped_column(String(64), index=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(1024))  # the VM's name or the paths
    time: Mapped[datetime.datetime]
    size: Mapped[int] = mapped_column(BigInteger, default=0)
