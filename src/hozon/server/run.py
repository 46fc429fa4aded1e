"""``hozon server run``: the API over HTTPS (uvicorn), with the scheduler beside it."""

from __future__ import annotations

import ssl

import uvicorn

from hozon.server import logs
from hozon.server.api.app import create_app
from hozon.server.catalog.db import upgrade
from hozon.server.context import ServerContext
from hozon.server.maintenance import Maintenance
from hozon.server.paths import ServerDir
from hozon.server.scheduler import Scheduler

# Seconds a stopping server gives open requests (a held agent poll ends at once with 204 anyway).
GRACEFUL_STOP = 5


def serve(server_dir: ServerDir) -> None:
    """Run until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    logs.configure()
    ctx = ServerContext.open(server_dir)
    upgrade(ctx.catalog.engine)
    maintenance = Maintenance(ctx)
    config = uvicorn.Config(
        create_app(ctx, maintenance), host=ctx.settings.host, port=ctx.settings.port, log_config=None,
        ssl_certfile=str(server_dir.server_cert), ssl_keyfile=str(server_dir.server_key),
        ssl_version=ssl.PROTOCOL_TLS_SERVER, timeout_keep_alive=30, timeout_graceful_shutdown=GRACEFUL_STOP,
    )
    scheduler = Scheduler(ctx, maintenance)
    scheduler.start()
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.stop()
        maintenance.shutdown()
