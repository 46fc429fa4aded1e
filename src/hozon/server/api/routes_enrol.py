"""Enrolment and the agents it makes: tokens (admin), ``POST /api/v1/enrol`` (token holder), agents (admin).

The CA certificate and the enrol route take no bearer credential: the certificate is public (its
fingerprint is what the enrolling side checks), and the enrolment token in the body is the credential.
"""

from __future__ import annotations

import datetime

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from hozon.server import enrolment
from hozon.server.api.deps import Principal, context, principal

router = APIRouter(prefix="/api/v1", tags=["enrolment"])


class TokenRequest(BaseModel):
    namespace: str
    expires_in: float = Field(3600, description="seconds until the token expires")


class EnrolRequest(BaseModel):
    token: str
    name: str
    hostname: str = ""
    version: str = ""


@router.post("/tokens", status_code=201)
def create_token(body: TokenRequest, request: Request, who: Principal = Depends(principal)) -> dict[str, str]:
    """A one-time enrolment token for a namespace (the namespace is created on first use)."""
    who.require_admin()
    new = enrolment.create_token(context(request), body.namespace, datetime.timedelta(seconds=body.expires_in))
    return {"token": new.token, "fingerprint": new.fingerprint, "url": new.url, "namespace": new.namespace,
            "expires": new.expires.isoformat()}


@router.get("/ca.pem", response_class=PlainTextResponse)
def ca_certificate(request: Request) -> str:
    """The server's CA certificate: public, fetched by ``agent enroll`` and checked against its fingerprint."""
    return context(request).server_dir.ca_cert.read_text()


@router.post("/enrol", status_code=201)
def enrol(body: EnrolRequest, request: Request) -> dict[str, object]:
    """Spend an enrolment token (the only credential this route takes) on a new agent."""
    new = enrolment.enrol(context(request), body.token, body.name, body.hostname, body.version)
    return {"agent_id": new.agent_id, "name": new.name, "secret": new.secret, "namespace": new.namespace,
            "password": new.password}


@router.get("/agents")
def agents(request: Request, who: Principal = Depends(principal)) -> list[dict[str, object]]:
    who.require_admin()
    return enrolment.list_agents(context(request))


@router.post("/agents/{name}/revoke", status_code=204)
def revoke(name: str, request: Request, who: Principal = Depends(principal)) -> None:
    who.require_admin()
    enrolment.revoke(context(request), name)
