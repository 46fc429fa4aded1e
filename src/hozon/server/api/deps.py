"""Who is asking: every request carries a bearer credential, mapped here to an admin or an agent.

Nothing is served without one (401). An agent may act only within its own namespace; helpers
below raise 403 otherwise, before anything is read or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi import HTTPException, Request
from sqlalchemy import select

from hozon.server.catalog.models import Agent, utcnow
from hozon.server.context import ServerContext
from hozon.server.credentials import digest, matches


@dataclass(frozen=True)
class Principal:
    kind: Literal["admin", "agent"]
    name: str  # "admin" or the agent's name
    agent_id: int | None = None
    namespace: str | None = None  # an agent's namespace; None for the admin (every namespace)

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def require_namespace(self, namespace: str) -> None:
        """403 unless this principal may act in ``namespace``."""
        if not self.is_admin and self.namespace != namespace:
            raise HTTPException(403, f"agent {self.name} may not use namespace {namespace}")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise HTTPException(403, "this needs the admin credential")


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.context
    return ctx


def principal(request: Request) -> Principal:
    """The FastAPI dependency every route takes."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret:
        raise HTTPException(401, "a credential is required", headers={"WWW-Authenticate": "Bearer"})
    ctx = context(request)
    if matches(secret, ctx.admin_digest):
        return Principal("admin", "admin")
    with ctx.catalog.session() as s:
        agent = s.scalars(select(Agent).where(Agent.secret_sha256 == digest(secret))).one_or_none()
        if agent is None or agent.revoked:
            raise HTTPException(401, "unknown or revoked credential", headers={"WWW-Authenticate": "Bearer"})
        agent.last_seen = utcnow()
        return Principal("agent", agent.name, agent.id, agent.namespace.name)
