"""What one running server process holds: its directory, settings, catalog and admin credential."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from hozon.server.catalog.db import Catalog
from hozon.server.paths import ServerDir, ServerSettings


@dataclass
class ServerContext:
    server_dir: ServerDir
    settings: ServerSettings
    catalog: Catalog
    admin_digest: str  # SHA-256 of the admin credential (the file holds the credential itself)
    # Who this process is when it takes a lease (several servers may share one PostgreSQL catalog).
    identity: str = field(default_factory=lambda: f"server:{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def open(cls, server_dir: ServerDir) -> ServerContext:
        from hozon.server.credentials import digest

        settings = server_dir.load_settings()
        catalog = Catalog(server_dir.catalog_url(settings))
        return cls(server_dir, settings, catalog, digest(server_dir.admin_token.read_text().strip()))
