"""Opening the catalog: an engine for its URL, sessions, and the schema brought up to date.

SQLite (embedded default) is opened with a busy timeout and WAL so the scheduler, the API and
maintenance can share it; PostgreSQL (``postgresql://…``, driven by psycopg 3) is for several
servers sharing one catalog.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hozon.errors import HozonError


def engine_for(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Create or migrate the schema to the newest revision (safe to run at every start)."""
    config = Config()
    config.set_main_option("script_location", str(files("hozon.server.catalog") / "migrations"))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except OperationalError as exc:
        raise HozonError(f"cannot open the catalog at {engine.url.render_as_string(hide_password=True)}: "
                         f"{exc.orig}") from exc


class Catalog:
    """The catalog of one server process: ``with catalog.session() as s:`` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()
