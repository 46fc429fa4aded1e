"""hozon backup: file-level backup of paths."""

from __future__ import annotations

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from hozon.backup.files import BackupCounters, BackupOptions, backup_files, load_exclude_file
from hozon.cli.common import (
    RepoOption,
    console,
    err_console,
    human_bytes,
    interactive,
    locked_repo,
    print_json,
)
from hozon.errors import UsageError
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
) -> None:
    """Back up files and directories; prints the new snapshot's id."""
    import os

    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{p} does not exist")
    excludes = list(exclude)
    for f in exclude_file:
        try:
            excludes += load_exclude_file(f)
        except OSError as exc:
            raise UsageError(f"cannot read exclude file {f}: {exc.strerror}") from exc
    options = BackupOptions(paths=paths, tags=tag, excludes=excludes, one_file_system=one_file_system, hostname=host)
    with locked_repo(repo, SHARED, "backup") as repository:
        if interactive() and not json_out:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=err_console, transient=True) as bar:
                task = bar.add_task("scanning")

                def show(c: BackupCounters) -> None:
                    bar.update(task, description=f"{c.total_files} files, {human_bytes(c.bytes_read)} read  "
                                                 f"[dim]{c.current[-60:]}[/]")

                result = backup_files(repository, options, show)
        else:
            result = backup_files(repository, options)
    snap = result.snapshot
    s = snap.summary
    if json_out:
        print_json({"snapshot": snap.listing(), "warnings": result.warnings})
    else:
        for w in result.warnings:
            # Paths as they are: never read as markup, never wrapped (logs are searched for them).
            err_console.print(Text.assemble(("warning:", "yellow"), " ", w), soft_wrap=True)
        console.print(
            f"files: {s['files_new']} new, {s['files_changed']} changed, {s['files_unmodified']} unmodified; "
            f"{s['dirs']} dirs; {human_bytes(s['total_bytes'])} in total"
        )
        console.print(f"added to the repository: {human_bytes(s['data_added'])} "
                      f"({human_bytes(s['data_added_stored'])} stored) in {s['duration_s']:.1f} s")
        console.print(f"snapshot {snap.short_id} saved")
    if result.warnings:
        if not json_out:
            err_console.print(f"[yellow]{len(result.warnings)} file(s) could not be read; snapshot is incomplete[/]")
        raise typer.Exit(WARNINGS_EXIT)
