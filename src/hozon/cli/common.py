"""What every command shares: opening the repository, the password, output and progress."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import Any

import typer
from rich.console import Console

from hozon.errors import Interrupted, RepositoryNotFound, RepositoryReadOnly, UsageError
from hozon.repo.backends import Backend, open_backend
from hozon.repo.locks import SHARED, Lock
from hozon.repo.repository import Repository

# Piped output is for scripts and logs: never wrap or truncate it.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err_console = Console(stderr=True, highlight=False)

RepoOption = typer.Option(
    None, "--repo", "-r", envvar="HOZON_REPO",
    help="Repository location: a directory, hozon+https://HOST:PORT/NAMESPACE (an enrolled agent's) or "
         "s3:https://HOST[:PORT]/BUCKET[/PREFIX]. "
         "Env: HOZON_REPO."
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")
RetryLockOption = typer.Option(
    "", "--retry-lock", metavar="DURATION",
    help="While another process holds a conflicting lock, keep trying for up to DURATION (30s, 5m, 1h).",
)
NoLockOption = typer.Option(
    False, "--no-lock", help="Read without taking a lock (automatic when the repository cannot be written).",
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def repo_location(repo: str | None) -> str:
    if not repo:
        raise UsageError("no repository given", hint="pass --repo DIR or set HOZON_REPO")
    return repo


def read_password(confirm: bool = False, prompt: str = "repository password: ", required: bool = True,
                  backend: Backend | None = None) -> str | None:
    """From HOZON_PASSWORD, HOZON_PASSWORD_FILE, an enrolled agent's (a server repository), or a prompt
    on a terminal (in that order).

    ``confirm``: a new password (asked twice on a terminal); an empty one is refused however it
    came. Not ``required``: None when neither variable is set, without prompting.
    """
    password = _given_password()
    if password is None and backend is not None:
        password = agent_password(backend)
    if password is None:
        if not required:
            return None
        if not sys.stdin.isatty():
            raise UsageError("no password given",
                             hint="set HOZON_PASSWORD or HOZON_PASSWORD_FILE, or run on a terminal")
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("enter it again: ") != password:
            raise UsageError("the two passwords differ")
    if confirm and not password:
        raise UsageError("an empty password is not allowed", hint="use --insecure-no-encryption for none")
    return password


def agent_password(backend: Backend) -> str | None:
    """An agent writing into its server's repository uses the password it got at enrolment."""
    from hozon.repo.backends.remote import RemoteBackend

    return backend.password if isinstance(backend, RemoteBackend) else None


def _given_password() -> str | None:
    if "HOZON_PASSWORD" in os.environ:
        return os.environ["HOZON_PASSWORD"]
    if "HOZON_PASSWORD_FILE" not in os.environ:
        return None
    path = os.environ["HOZON_PASSWORD_FILE"]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\n")
    except OSError as exc:
        raise UsageError(f"cannot read the password file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"the password file {path} is not UTF-8 text (byte {exc.start})") from exc


def open_repo(repo: str | None, load_index: bool = True) -> Repository:
    backend = open_backend(repo_location(repo))
    if not backend.exists("config"):
        raise RepositoryNotFound(backend.location)
    password = read_password(required=Repository.needs_password(backend), backend=backend)
    repository = Repository.open(backend, password)
    if load_index:
        repository.load_index()
    return repository


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``1h30m`` or ``500ms`` (restic's and Go's spelling)."""
    if not text:
        return 0.0
    if not re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
        raise UsageError(f"{text!r} is not a duration", hint="write it like 30s, 5m, 1h or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


@contextmanager
def locked_repo(repo: str | None, kind: str, command: str, load_index: bool = True,
                retry_lock: str = "") -> Iterator[Repository]:
    retry_for = parse_duration(retry_lock)
    repository = open_repo(repo, load_index=False)
    with Lock(repository, kind, command, retry_for):
        if load_index:
            repository.load_index()
        yield repository


@contextmanager
def reading_repo(repo: str | None, command: str, load_index: bool = True, retry_lock: str = "",
                 no_lock: bool = False) -> Iterator[Repository]:
    """A repository to read under a shared lock; with none if told so or if it cannot be written."""
    retry_for = parse_duration(retry_lock)
    repository = open_repo(repo, load_index=False)
    with ExitStack() as stack:
        if not no_lock:
            try:
                stack.enter_context(Lock(repository, SHARED, command, retry_for))
            except RepositoryReadOnly as exc:
                err_console.print(f"note: {exc.message}; reading without a lock", markup=False, soft_wrap=True)
        if load_index:
            repository.load_index()
        yield repository


def open_for_reading(ctx: typer.Context, repo: str | None, load_index: bool = True, retry_lock: str = "",
                     no_lock: bool = False) -> Repository:
    """``reading_repo`` for the rest of the command ``ctx`` runs (its lock goes when the command returns)."""
    command = ctx.info_name or "read"
    repository: Repository = ctx.with_resource(reading_repo(repo, command, load_index, retry_lock, no_lock))
    return repository


@contextmanager
def saving_snapshot(what: str) -> Iterator[None]:
    """Ctrl-C before the snapshot is saved: say so (typer would turn it into a silent exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"{what} was interrupted; no snapshot was saved (the data stored so far is reused "
                          "by the next run)") from None


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def interactive() -> bool:
    return sys.stderr.isatty()


def local_time(iso: str) -> str:
    """A stored snapshot time in the viewer's zone, zone marked (``2026-12-07 17:00:02 EST``)."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
