"""hozon restore: file snapshots back to a directory."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from hozon.cli.common import (
    NoLockOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    interactive,
    reading_repo,
)
from hozon.restore.files import RestoreCounters, RestoreOptions, restore_files

WARNINGS_EXIT = 3


def restore(
    snapshot: str = typer.Argument(..., help="Snapshot id, prefix, or 'latest'."),
    target: str = typer.Option(..., "--target", "-t", help="Directory to restore into (created if missing)."),
    repo: str | None = RepoOption,
    include: list[str] = typer.Option([], "--include", "-i", help="Only restore paths matching P (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", help="Skip paths matching P (repeatable)."),
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Restore a file snapshot below --target; nothing is ever written outside it."""
    options = RestoreOptions(target=target, includes=include, excludes=exclude)
    with reading_repo(repo, "restore", retry_lock=retry_lock, no_lock=no_lock) as repository:
        snap = repository.resolve_snapshot(snapshot)
        if interactive():
            with Progress(TextColumn("restoring"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True) as bar:
                task = bar.add_task("restore", total=snap.summary.get("total_bytes") or None)

                def show(c: RestoreCounters) -> None:
                    bar.update(task, completed=c.bytes_written, total=c.total_bytes or None)

                result = restore_files(repository, snap, options, show)
        else:
            result = restore_files(repository, snap, options)
    for w in result.warnings:
        # Paths as they are: never read as markup, never wrapped (logs are searched for them).
        err_console.print(Text.assemble(("warning:", "yellow"), " ", w), soft_wrap=True)
    c = result.counters
    console.print(f"restored snapshot {snap.short_id} to {target}: {c.files} files, {c.dirs} dirs, "
                  f"{human_bytes(c.bytes_written)}", markup=False)
    if result.warnings:
        raise typer.Exit(WARNINGS_EXIT)
