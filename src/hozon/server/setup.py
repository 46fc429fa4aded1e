"""``hozon server init``: a server directory with its CA, certificate, admin credential and catalog."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hozon.errors import UsageError
from hozon.server import pki
from hozon.server.catalog.db import Catalog, upgrade
from hozon.server.credentials import new_secret
from hozon.server.paths import ServerDir, ServerSettings, write_private


@dataclass(frozen=True)
class InitResult:
    server_dir: ServerDir
    settings: ServerSettings
    fingerprint: str  # of the CA certificate: what agents pin

    @property
    def url(self) -> str:
        return server_url(self.settings)


def server_url(settings: ServerSettings) -> str:
    host = settings.names[0] if settings.names else settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{settings.port}"


def init_server(root: Path, listen: str, names: list[str], catalog: str) -> InitResult:
    """Create everything a server needs in ``root``; refuses a directory that already holds one."""
    server_dir = ServerDir(root)
    if server_dir.exists():
        raise UsageError(f"{root} already holds a Hozon server", hint=f"start it with: hozon server run --dir {root}")
    if ":" not in listen or not listen.rsplit(":", 1)[1].isdigit():
        raise UsageError(f"--listen {listen!r} is not HOST:PORT")
    settings = ServerSettings(listen=listen, names=names, catalog=catalog)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    db = Catalog(server_dir.catalog_url(settings))
    try:
        upgrade(db.engine)  # first: a catalog URL that does not work fails before anything is written
    finally:
        db.close()
    pki.create_ca(server_dir)
    cert_names = [*names, settings.host] if settings.host not in ("0.0.0.0", "::", "") else names
    pki.create_server_cert(server_dir, cert_names)
    write_private(server_dir.admin_token, new_secret("admin") + "\n")
    server_dir.save_settings(settings)  # last: its presence means the directory is complete
    return InitResult(server_dir, settings, pki.fingerprint(server_dir.ca_cert.read_bytes()))
