"""``hozon server run``: the API over HTTPS (uvicorn), with the scheduler beside it."""

from __future__ import annotations

import ssl

import uvicorn

from hozon.server.api.app import create_app
from hozon.server.catalog.db import upgrade
from hozon.server.context import ServerContext
from hozon.server.paths import ServerDir


def serve(server_dir: ServerDir) -> None:
    """Run until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    ctx = ServerContext.open(server_dir)
    upgrade(ctx.catalog.engine)
    config = uvicorn.Config(
        create_app(ctx), host=ctx.settings.host, port=ctx.settings.port, log_level="warning",
        ssl_certfile=str(server_dir.server_cert), ssl_keyfile=str(server_dir.server_key),
        ssl_version=ssl.PROTOCOL_TLS_SERVER, timeout_keep_alive=30,
    )
    uvicorn.Server(config).run()
