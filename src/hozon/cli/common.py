"""What every command shares: opening the repository, the password, output and progress."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import Any

import typer
from rich.console import Console

from hozon import compress, priority
from hozon.cli.password import read_password
from hozon.errors import Interrupted, RepositoryNotFound, RepositoryReadOnly, UsageError
from hozon.repo.backends import open_backend
from hozon.repo.locks import SHARED, Lock
from hozon.repo.repository import Repository

# Piped output is for scripts and logs: never wrap or truncate it.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err_console = Console(stderr=True, highlight=False)

RepoOption = typer.Option(
    None, "--repo", "-r", metavar="REPO", envvar="HOZON_REPO",
    help="Repository location: a directory, hozon+https://HOST:PORT/NAMESPACE (an enrolled agent's) or "
         "s3:https://HOST[:PORT]/BUCKET[/PREFIX].",
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON.")
RetryLockOption = typer.Option(
    "", "--retry-lock", metavar="DURATION",
    help="While another process holds a conflicting lock, keep trying for up to DURATION (30s, 5m, 1h).",
)
NoLockOption = typer.Option(
    False, "--no-lock", help="Read without taking a lock (automatic when the repository cannot be written).",
)

CompressionOption = typer.Option(
    "auto", "--compression", metavar="MODE",
    help="How new data is compressed: auto (zstd level 3), fast (level 1), max (level 19: slow), off (stored as "
         "is). Default: auto.",
)
WorkersOption = typer.Option(
    0, "--workers", metavar="N", min=0,
    help="Threads that hash, compress and encrypt (and read small files); default: one per core, at least 2.",
)
NiceOption = typer.Option(
    None, "--nice", metavar="N",
    help="Run at CPU priority N (0-19, as nice(1): higher takes less). Default: as started.",
)
IoniceOption = typer.Option(
    None, "--ionice", metavar="CLASS[:LEVEL]",
    help="Run at I/O priority idle, or best-effort:LEVEL (0 first … 7 last), as ionice(1). Default: as started.",
)
QuietOption = typer.Option(False, "--quiet", "-q", help="Print only errors and warnings (and --json's summary).")
VerboseOption = typer.Option(False, "--verbose", "-v", help="Also name each file as it is processed.")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def repo_location(repo: str | None) -> str:
    if not repo:
        raise UsageError("no repository given", hint="pass --repo DIR or set HOZON_REPO")
    return repo


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


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``4096``, ``500K``, ``1.5G`` or ``2TiB`` (binary units, as restic's)."""
    found = _SIZE.fullmatch(text.strip())
    if not found:
        raise UsageError(f"{text!r} is not a size", hint="write it like 4096, 500K, 100M, 1.5G (K = 1024 bytes)")
    return int(float(found.group(1)) * 1024 ** " kmgt".index(found.group(2).lower() or " "))


def compression_level(mode: str) -> int | None:
    if mode not in compress.LEVELS:
        raise UsageError(f"--compression takes {', '.join(compress.LEVELS)}, not {mode!r}")
    return compress.LEVELS[mode]


def lower_priority(nice: int | None, ionice: str | None) -> None:
    """--nice and --ionice, applied to this process before any worker thread starts."""
    if nice is not None:
        priority.set_nice(nice)
    if ionice is not None:
        priority.set_ionice(ionice)


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
