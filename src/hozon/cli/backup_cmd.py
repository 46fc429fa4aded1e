"""hozon backup: file-level backup of paths."""

from __future__ import annotations

import os

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from hozon.backup.files import BackupCounters, BackupOptions, BackupResult, backup_files, load_exclude_file
from hozon.cli.common import (
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    interactive,
    locked_repo,
    print_json,
    saving_snapshot,
)
from hozon.errors import UsageError
from hozon.pathmatch import compiled
from hozon.repo.locks import SHARED

WARNINGS_EXIT = 3


def backup(
    paths: list[str] = typer.Argument(..., metavar="PATH", help="Files and directories to back up."),
    repo: str | None = RepoOption,
    tag: list[str] = typer.Option([], "--tag", help="Tag the snapshot (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", help="Skip paths matching GLOB (repeatable)."),
    exclude_file: list[str] = typer.Option([], "--exclude-file", help="Read exclude globs from FILE."),
    one_file_system: bool = typer.Option(False, "--one-file-system", "-x", help="Stay on the file systems of PATHs."),
    host: str = typer.Option("", "--host", help="Hostname recorded in the snapshot (default: this host)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    retry_lock: str = RetryLockOption,
) -> None:
    """Back up files and directories; prints the new snapshot's id."""
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{p} does not exist")
    excludes = list(exclude)
    for f in exclude_file:
        try:
            excludes += load_exclude_file(f)
        except OSError as exc:
            raise UsageError(f"cannot read exclude file {f}: {exc.strerror}") from exc
    compiled(tuple(excludes))  # a pattern that names no path is a usage error before anything is read
    options = BackupOptions(paths=paths, tags=tag, excludes=excludes, one_file_system=one_file_system, hostname=host)
    if "HOZON_STALL_SECONDS" in os.environ:
        options.stall_after = _seconds("HOZON_STALL_SECONDS")
    shown: set[str] = set()

    def show_warning(warning: str) -> None:  # a stalled read: named now, while the backup still waits
        shown.add(warning)
        _print_warning(warning)

    with locked_repo(repo, SHARED, "backup", retry_lock=retry_lock) as repository:
        with saving_snapshot("the backup"):
            if interactive() and not json_out:
                with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                              console=err_console, transient=True) as bar:
                    task = bar.add_task("scanning")

                    def show(c: BackupCounters) -> None:
                        bar.update(task, description=f"{c.total_files} files, {human_bytes(c.bytes_read)} read  "
                                                     f"[dim]{c.current[-60:]}[/]")

                    result = backup_files(repository, options, show, show_warning)
            else:
                result = backup_files(repository, options, on_warning=show_warning)
        _render(result, json_out, shown)  # before the lock goes: if removing it fails, the snapshot id is out already
    if result.warnings:
        raise typer.Exit(WARNINGS_EXIT)


def _render(result: BackupResult, json_out: bool, shown: set[str]) -> None:
    snap = result.snapshot
    s = snap.summary
    if json_out:
        print_json({"snapshot": snap.listing(), "warnings": result.warnings})
        return
    for w in result.warnings:
        if w not in shown:
            _print_warning(w)
    console.print(
        f"files: {s['files_new']} new, {s['files_changed']} changed, {s['files_unmodified']} unmodified; "
        f"{s['dirs']} dirs; {human_bytes(s['total_bytes'])} in total"
    )
    console.print(f"added to the repository: {human_bytes(s['data_added'])} "
                  f"({human_bytes(s['data_added_stored'])} stored) in {s['duration_s']:.1f} s")
    console.print(f"snapshot {snap.short_id} saved")
    if result.warnings:
        err_console.print(f"[yellow]{len(result.warnings)} warning(s): the snapshot is incomplete or "
                          "inconsistent where they say[/]")


def _print_warning(warning: str) -> None:
    # Paths as they are: never read as markup, never wrapped (logs are searched for them).
    err_console.print(Text.assemble(("warning:", "yellow"), " ", warning), soft_wrap=True)


def _seconds(variable: str) -> float:
    raw = os.environ[variable]
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"{variable} must be a number of seconds above 0, not {raw!r}")
    return value
