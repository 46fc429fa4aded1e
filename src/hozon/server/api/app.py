"""The FastAPI application of one server process; routers are added per concern."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from hozon import __version__
from hozon.server.api import errors, metrics, routes_admin, routes_agent, routes_enrol, routes_storage
from hozon.server.api.deps import Principal, principal
from hozon.server.context import ServerContext
from hozon.server.maintenance import Maintenance


def create_app(ctx: ServerContext, maintenance: Maintenance | None = None) -> FastAPI:
    app = FastAPI(title="Hozon backup server", version=__version__, docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None)
    app.state.context = ctx
    app.state.maintenance = maintenance or Maintenance(ctx)
    app.state.metrics_digest = metrics.metrics_digest(ctx.server_dir)
    errors.install(app)
    app.include_router(routes_enrol.router)
    app.include_router(routes_storage.router)

    @app.get("/api/v1/whoami")
    def whoami(who: Principal = Depends(principal)) -> dict[str, object]:
        """Who the credential belongs to (a quick check of a credential and of the TLS pinning)."""
        return {"kind": who.kind, "name": who.name, "namespace": who.namespace, "version": __version__}

    app.include_router(routes_admin.router)
    app.include_router(routes_agent.router)
    app.include_router(metrics.router)
    return app
