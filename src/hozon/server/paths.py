"""The server directory (``hozon server init --dir DIR``): where each of its files lives.

    DIR/server.json            listen address, names, catalog URL (written by init)
    DIR/admin.token            the admin credential (0600)
    DIR/metrics.token          a read-only credential for GET /metrics (0600; made at first start)
    DIR/tls/ca.pem, ca.key     the server's own certificate authority (key 0600)
    DIR/tls/server.pem, .key   the server certificate it signed (key 0600)
    DIR/catalog.sqlite         the embedded catalog (unless a PostgreSQL URL is configured)
    DIR/keys/NS.password       each namespace's repository password (0600)
    DIR/datastore/NS/          each namespace's Hozon repository
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hozon.errors import UsageError
from hozon.private_file import write_private as write_private  # where the server modules have it from

NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_LISTEN = "127.0.0.1:8443"


@dataclass
class ServerSettings:
    """What ``server init`` decided; kept in DIR/server.json."""

    listen: str = DEFAULT_LISTEN
    names: list[str] = field(default_factory=list)  # extra DNS names / addresses in the certificate
    catalog: str = ""  # empty: the embedded SQLite catalog

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class ServerDir:
    root: Path

    @property
    def settings_file(self) -> Path:
        return self.root / "server.json"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"

    @property
    def metrics_token(self) -> Path:
        return self.root / "metrics.token"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.tls / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls / "server.key"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def datastore(self) -> Path:
        return self.root / "datastore"

    def repository(self, namespace: str) -> Path:
        return self.datastore / check_namespace(namespace)

    def password_file(self, namespace: str) -> Path:
        return self.keys / f"{check_namespace(namespace)}.password"

    def catalog_url(self, settings: ServerSettings) -> str:
        return settings.catalog or f"sqlite:///{self.root / 'catalog.sqlite'}"

    def exists(self) -> bool:
        return self.settings_file.exists()

    def load_settings(self) -> ServerSettings:
        try:
            doc = json.loads(self.settings_file.read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"{self.root} is not a Hozon server directory",
                             hint=f"create one with: hozon server init --dir {self.root}") from exc
        known = {k: v for k, v in doc.items() if k in ServerSettings.__dataclass_fields__}
        return ServerSettings(**known)

    def save_settings(self, settings: ServerSettings) -> None:
        write_private(self.settings_file, json.dumps(asdict(settings), indent=2) + "\n")


def check_namespace(name: str) -> str:
    """A namespace name is a path component: lower-case letters, digits, '-' and '_'."""
    if not NAMESPACE_RE.fullmatch(name):
        raise UsageError(f"{name!r} is not a valid namespace name",
                         hint="use lower-case letters, digits, '-' and '_' (at most 63)")
    return name
