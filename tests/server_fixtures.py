"""Test helpers for the server's jobs: agents put straight into the catalog, namespace repositories,
and a real PostgreSQL 15 (``initdb`` + ``pg_ctl`` in a temp directory, unix socket only).

Agents are inserted as enrolment would leave them (a row with the SHA-256 of a fresh secret), so
these tests need no enrolment code; the agent protocol is then driven with httpx as an agent would.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.hozon_server import RunningServer

from hozon.repo.backends.local import LocalBackend
from hozon.repo.repository import Repository
from hozon.server.catalog.db import Catalog
from hozon.server.catalog.models import Agent
from hozon.server.credentials import digest, new_secret
from hozon.server.jobs import namespace_row
from hozon.server.paths import ServerDir, write_private


def catalog_url(server: RunningServer) -> str:
    return server.catalog or f"sqlite:///{server.directory / 'catalog.sqlite'}"


def add_agent(server: RunningServer, name: str, namespace: str) -> str:
    """An enrolled agent of ``namespace``; its secret (the bearer credential)."""
    secret = new_secret("agent")
    catalog = Catalog(catalog_url(server))
    try:
        with catalog.session() as s:
            s.add(Agent(name=name, namespace=namespace_row(s, namespace), secret_sha256=digest(secret)))
    finally:
        catalog.close()
    return secret


def namespace_repository(server: RunningServer, namespace: str) -> dict[str, str]:
    """Create the namespace's repository and password file as the server keeps them; the environment
    that points ``hozon`` at it (HOZON_REPO, HOZON_PASSWORD_FILE)."""
    server_dir = ServerDir(server.directory)
    password = new_secret("agent")  # any 32 random bytes will do
    Repository.init(LocalBackend(server_dir.repository(namespace)), password)
    write_private(server_dir.password_file(namespace), password + "\n")
    return {"HOZON_REPO": str(server_dir.repository(namespace)),
            "HOZON_PASSWORD_FILE": str(server_dir.password_file(namespace)), "HOZON_PASSWORD": ""}


def hozon_env(repo_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **repo_env}
    env.pop("HOZON_PASSWORD", None)
    return env


class AgentApi:
    """The agent protocol spoken as an agent would: bearer secret, the server's CA only."""

    def __init__(self, server: RunningServer, secret: str, url: str | None = None) -> None:
        self.http = httpx.Client(base_url=url or server.url, verify=server.tls(), timeout=60,
                                 headers={"Authorization": f"Bearer {secret}"})

    def poll(self, wait: float = 0) -> dict[str, Any] | None:
        response = self.http.post("/api/v1/agent/poll", json={"wait": wait})
        assert response.status_code in (200, 204), response.text
        return response.json() if response.status_code == 200 else None

    def progress(self, run_id: int, **doc: Any) -> httpx.Response:
        return self.http.post(f"/api/v1/agent/runs/{run_id}/progress", json=doc)

    def log(self, run_id: int, *lines: str) -> httpx.Response:
        return self.http.post(f"/api/v1/agent/runs/{run_id}/log", json={"lines": list(lines)})

    def finish(self, run_id: int, state: str, reason: str = "", **doc: Any) -> httpx.Response:
        return self.http.post(f"/api/v1/agent/runs/{run_id}/finish", json={"state": state, "reason": reason, **doc})

    def close(self) -> None:
        self.http.close()


def wait_for(what: str, check: Any, timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll ``check()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- PostgreSQL -----------------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


NEEDS_POSTGRES = pytest.mark.skipif(
    _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None,
    reason="needs PostgreSQL's initdb and pg_ctl (Debian package postgresql; scripts/setup --dev installs it)",
)


@dataclass
class Postgres:
    socket_dir: Path
    _names: Iterator[int]

    def new_database(self) -> str:
        """A fresh, empty database; its URL (unix socket, user postgres)."""
        import psycopg

        name = f"hozon_{next(self._names)}"
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@/{name}?host={self.socket_dir}"


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def start_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server listening only on a unix socket in a temp directory, removed afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    assert initdb and pg_ctl, "PostgreSQL's initdb and pg_ctl are not installed"
    base = Path(tempfile.mkdtemp(prefix="hozon-pg-"))  # short: a socket path has at most 107 bytes
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data, log = base / "data", base / "server.log"
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
                                 "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses='' -c unix_socket_directories={base} -c fsync=off -c max_connections=200"
    started = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]),
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
    try:
        yield Postgres(base, itertools.count(1))
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the test session."""
    with start_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=NEEDS_POSTGRES)])
def catalog(request: pytest.FixtureRequest) -> str:
    """The catalog URL a test's server is initialised with: "" (SQLite in DIR) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ""
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.new_database()
