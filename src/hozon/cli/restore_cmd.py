"""hozon restore: file snapshots back to a directory."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from hozon.cli.common import (
    NoLockOption,
    QuietOption,
    RepoOption,
    RetryLockOption,
    VerboseOption,
    console,
    err_console,
    human_bytes,
    interactive,
    print_json,
    reading_repo,
)
from hozon.cli.status import JsonStatus
from hozon.restore.files import RestoreCounters, RestoreOptions, restore_files

WARNINGS_EXIT = 3


def restore(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Snapshot id, prefix, 'latest' or 'latest:PATH'."),
    target: str = typer.Option(..., "--target", "-t", metavar="DIR",
                               help="Directory to restore into (created if missing)."),
    repo: str | None = RepoOption,
    include: list[str] = typer.Option([], "--include", "-i", metavar="PATTERN",
                                      help="Only restore paths matching PATTERN (repeatable; syntax: "
                                           "docs/patterns.md)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", metavar="PATTERN",
                                      help="Skip paths matching PATTERN (repeatable; syntax: docs/patterns.md)."),
    overwrite: str = typer.Option("always", "--overwrite", metavar="WHEN",
                                  help="An entry already in the target: always, if-changed (size or mtime "
                                       "differ), if-newer (the snapshot's mtime is newer), never. Default: always."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Write nothing; say what would be done."),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary; progress and warnings as JSON lines "
                                                        "on stderr."),
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Restore a file snapshot below --target; nothing is ever written outside it."""
    options = RestoreOptions(target=target, includes=include, excludes=exclude, overwrite=overwrite,
                             dry_run=dry_run)
    status = JsonStatus("restore") if json_out else None
    show_files = verbose and not (quiet or json_out)

    def each_file(path: str) -> None:
        console.print(Text.assemble("restored ", path), soft_wrap=True)

    with reading_repo(repo, "restore", retry_lock=retry_lock, no_lock=no_lock) as repository:
        snap = repository.resolve_snapshot(snapshot)
        if interactive() and not (json_out or quiet or show_files or dry_run):
            with Progress(TextColumn("restoring"), BarColumn(), DownloadColumn(binary_units=True),  # KiB, as all sizes
                          TimeRemainingColumn(), console=err_console, transient=True) as bar:
                task = bar.add_task("restore", total=snap.summary.get("total_bytes") or None)

                def show(c: RestoreCounters) -> None:
                    bar.update(task, completed=c.bytes_written, total=c.total_bytes or None)

                result = restore_files(repository, snap, options, show)
        else:
            def report(c: RestoreCounters) -> None:
                assert status is not None
                status.status(files_done=c.files, total_files=c.total_files, bytes_done=c.bytes_written,
                              total_bytes=c.total_bytes, current=[c.current])

            result = restore_files(repository, snap, options, report if status else None,
                                   each_file if show_files else None)
    c = result.counters
    for w in result.warnings:
        if status is not None:
            status.error(w)
        else:  # paths as they are: never read as markup, never wrapped (logs are searched for them)
            err_console.print(Text.assemble(("warning:", "yellow"), " ", w), soft_wrap=True)
    if json_out:
        print_json({"snapshot": snap.id, "target": target, "dry_run": dry_run, "files": c.files, "dirs": c.dirs,
                    "bytes": c.bytes_written, "overwritten": c.overwritten, "skipped": c.skipped,
                    "warnings": result.warnings,
                    **({"existing": [{"action": a, "path": p} for a, p in result.existing]} if dry_run else {})})
    elif not quiet:
        for action, path in result.existing:  # a dry run: what would happen to what is there
            console.print(Text.assemble(f"would {action} ", path), soft_wrap=True)
        verb = "would restore" if dry_run else "restored"
        console.print(f"{verb} snapshot {snap.short_id} to {target}: {c.files} files, {c.dirs} dirs, "
                      f"{human_bytes(c.bytes_written)}; {c.overwritten} replaced, {c.skipped} left as they were",
                      markup=False)
    if result.warnings:
        raise typer.Exit(WARNINGS_EXIT)
