"""What every command shares: opening the repository, the password, output and progress."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from hozon.errors import RepositoryNotFound, UsageError
from hozon.repo.backends import Backend, open_backend
from hozon.repo.locks import Lock
from hozon.repo.repository import Repository

# Piped output is for scripts and logs: never wrap or truncate it.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err_console = Console(stderr=True, highlight=False)

RepoOption = typer.Option(
    None, "--repo", "-r", envvar="HOZON_REPO",
    help="Repository location: a directory, or hozon+https://HOST:PORT/NAMESPACE (an enrolled agent's). "
         "Env: HOZON_REPO."
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")


def repo_location(repo: str | None) -> str:
    if not repo:
        raise UsageError("no repository given", hint="pass --repo DIR or set HOZON_REPO")
    return repo


def read_password(confirm: bool = False, prompt: str = "repository password: ", backend: Backend | None = None) -> str:
    """From HOZON_PASSWORD, HOZON_PASSWORD_FILE, an enrolled agent's (a server repository), or a prompt."""
    if "HOZON_PASSWORD" in os.environ:
        return os.environ["HOZON_PASSWORD"]
    if "HOZON_PASSWORD_FILE" in os.environ:
        path = os.environ["HOZON_PASSWORD_FILE"]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"cannot read the password file {path}: {exc.strerror}") from exc
    if backend is not None and backend.location.startswith("hozon+https:"):
        from hozon.repo.backends.remote import RemoteBackend

        if isinstance(backend, RemoteBackend):
            return backend.password
    if not sys.stdin.isatty():
        raise UsageError("no password given", hint="set HOZON_PASSWORD or HOZON_PASSWORD_FILE, or run on a terminal")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("enter it again: ") != first:
        raise UsageError("the two passwords differ")
    if confirm and not first:
        raise UsageError("an empty password is not allowed", hint="use --insecure-no-encryption for none")
    return first


def open_repo(repo: str | None, load_index: bool = True) -> Repository:
    backend = open_backend(repo_location(repo))
    if not backend.exists("config"):
        raise RepositoryNotFound(backend.location)
    password = read_password(backend=backend) if Repository.needs_password(backend) else None
    repository = Repository.open(backend, password)
    if load_index:
        repository.load_index()
    return repository


@contextmanager
def locked_repo(repo: str | None, kind: str, command: str, load_index: bool = True) -> Iterator[Repository]:
    repository = open_repo(repo, load_index=False)
    with Lock(repository, kind, command):
        if load_index:
            repository.load_index()
        yield repository


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def interactive() -> bool:
    return sys.stderr.isatty()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
