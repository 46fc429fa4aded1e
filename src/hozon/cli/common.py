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
from hozon.repo.backends import open_backend
from hozon.repo.locks import Lock
from hozon.repo.repository import Repository

# Piped output is for scripts and logs: never wrap or truncate it.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err_console = Console(stderr=True, highlight=False)

RepoOption = typer.Option(
    None, "--repo", "-r", envvar="HOZON_REPO", help="Repository location (a directory). Env: HOZON_REPO."
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")


def repo_location(repo: str | None) -> str:
    if not repo:
        raise UsageError("no repository given", hint="pass --repo DIR or set HOZON_REPO")
    return repo


def read_password(confirm: bool = False, prompt: str = "repository password: ", required: bool = True) -> str | None:
    """From HOZON_PASSWORD, HOZON_PASSWORD_FILE, or a prompt on a terminal (in that order).

    ``confirm``: a new password (asked twice on a terminal); an empty one is refused however it
    came. Not ``required``: None when neither variable is set, without prompting.
    """
    password = _given_password()
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
    password = read_password(required=Repository.needs_password(backend))
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
