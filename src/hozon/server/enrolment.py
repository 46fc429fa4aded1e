"""Enrolment: one-time tokens for a namespace, turned into agents with their own credential.

``server token create`` stores only the SHA-256 of a token's secret, with its namespace and expiry.
``POST /api/v1/enrol`` spends it: in one transaction a new agent row (its credential stored hashed)
is added and the token is marked used only if it still was unused, so a token enrols exactly one
agent even when two try at once. The agent gets its credential and its namespace's repository
password once, in the answer.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from hozon.errors import ServerError
from hozon.https import enrolment_token, split_enrolment_token
from hozon.server import pki
from hozon.server.catalog.models import Agent, EnrolmentToken, Namespace, utcnow
from hozon.server.context import ServerContext
from hozon.server.credentials import digest, new_secret
from hozon.server.paths import NAMESPACE_RE
from hozon.server.setup import server_url
from hozon.server.storage import ensure_namespace, namespace_password

AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_LIFETIME = datetime.timedelta(days=30)


@dataclass(frozen=True)
class NewToken:
    token: str
    fingerprint: str
    url: str
    namespace: str
    expires: datetime.datetime


@dataclass(frozen=True)
class Enrolled:
    agent_id: int
    name: str
    secret: str
    namespace: str
    password: str


def create_token(ctx: ServerContext, namespace: str, lifetime: datetime.timedelta) -> NewToken:
    """A one-time enrolment token for ``namespace`` (created on first use), valid for ``lifetime``."""
    if not datetime.timedelta(seconds=1) <= lifetime <= MAX_LIFETIME:
        raise ServerError("a token's lifetime must be between one second and 30 days", 400)
    if not NAMESPACE_RE.fullmatch(namespace):
        raise ServerError(f"{namespace!r} is not a valid namespace name (lower-case letters, digits, '-', '_')", 400)
    namespace_id = ensure_namespace(ctx, namespace)
    secret = new_secret("enrol")
    expires = utcnow() + lifetime
    with ctx.catalog.session() as s:
        s.add(EnrolmentToken(sha256=digest(secret), namespace_id=namespace_id, expires=expires))
    fingerprint = pki.fingerprint(ctx.server_dir.ca_cert.read_bytes())
    return NewToken(enrolment_token(secret, fingerprint), fingerprint, server_url(ctx.settings), namespace, expires)


def enrol(ctx: ServerContext, token: str, name: str, hostname: str, version: str) -> Enrolled:
    """Spend ``token`` on a new agent called ``name``; nothing is written when it is refused."""
    if not AGENT_NAME_RE.fullmatch(name):
        raise ServerError(f"{name!r} is not a valid agent name (letters, digits, '.', '-', '_'; at most 128)", 400)
    secret_part, _fingerprint = split_enrolment_token(token)
    secret = new_secret("agent")
    try:
        with ctx.catalog.session() as s:
            row = s.scalars(select(EnrolmentToken).where(EnrolmentToken.sha256 == digest(secret_part))).one_or_none()
            if row is None:
                raise ServerError("the enrolment token is not known to this server", 401)
            if row.used_by is not None:
                raise ServerError("the enrolment token was used already; create a new one", 401)
            if as_utc(row.expires) <= utcnow():
                raise ServerError("the enrolment token has expired; create a new one", 401)
            namespace = s.get_one(Namespace, row.namespace_id).name
            agent = Agent(name=name, namespace_id=row.namespace_id, secret_sha256=digest(secret),
                          hostname=hostname[:255], version=version[:32])
            s.add(agent)
            s.flush()
            spent = s.execute(update(EnrolmentToken).where(EnrolmentToken.id == row.id,
                                                           EnrolmentToken.used_by.is_(None))
                              .values(used_by=agent.id))
            if getattr(spent, "rowcount", 0) != 1:
                raise ServerError("the enrolment token was used already; create a new one", 401)
            agent_id = agent.id
    except IntegrityError:
        raise ServerError(f"an agent named {name} exists already; enrol with another --name", 409) from None
    return Enrolled(agent_id, name, secret, namespace, namespace_password(ctx.server_dir, namespace))


def list_agents(ctx: ServerContext) -> list[dict[str, object]]:
    with ctx.catalog.session() as s:
        return [{"id": a.id, "name": a.name, "namespace": a.namespace.name, "hostname": a.hostname,
                 "version": a.version, "enrolled": as_utc(a.enrolled).isoformat(),
                 "last_seen": as_utc(a.last_seen).isoformat() if a.last_seen else None, "revoked": a.revoked}
                for a in s.scalars(select(Agent).order_by(Agent.name))]


def revoke(ctx: ServerContext, name: str) -> None:
    """From now on the agent's credential is refused (401); its snapshots stay."""
    with ctx.catalog.session() as s:
        agent = s.scalars(select(Agent).where(Agent.name == name)).one_or_none()
        if agent is None:
            raise ServerError(f"no agent is named {name}", 404)
        agent.revoked = True


def as_utc(moment: datetime.datetime) -> datetime.datetime:
    """SQLite gives back naive datetimes; the catalog stores UTC only."""
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
