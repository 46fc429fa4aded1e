"""hozon backup: file-level backup of paths."""

from __future__ import annotations

import os

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from hozon.backup.files import BackupCounters, BackupOptions, BackupResult, backup_files, load_exclude_file
from hozon.cli.common import (
    CompressionOption,
    IoniceOption,
    NiceOption,
    QuietOption,
    RepoOption,
    RetryLockOption,
    VerboseOption,
    WorkersOption,
    compression_level,
    console,
    err_console,
    human_bytes,
    interactive,
    locked_repo,
    lower_priority,
    parse_size,
    print_json,
    saving_snapshot,
)
from hozon.cli.status import JsonStatus
from hozon.errors import UsageError
from hozon.pathmatch import compiled
from hozon.repo.locks import SHARED

WARNINGS_EXIT = 3


def backup(
    paths: list[str] = typer.Argument(None, metavar="PATH", help="Files and directories to back up."),
    repo: str | None = RepoOption,
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag the snapshot (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", metavar="PATTERN",
                                      help="Skip paths matching PATTERN (repeatable; syntax: docs/patterns.md)."),
    exclude_file: list[str] = typer.Option([], "--exclude-file", metavar="FILE",
                                           help="Read exclude patterns from FILE, one a line, # comments."),
    exclude_caches: bool = typer.Option(False, "--exclude-caches",
                                        help="Keep only the CACHEDIR.TAG of a directory holding a valid one."),
    exclude_larger_than: str = typer.Option("", "--exclude-larger-than", metavar="SIZE",
                                            help="Skip files larger than SIZE (500K, 100M, 2G; binary units), "
                                                 "silently, as an exclude does."),
    files_from: list[str] = typer.Option([], "--files-from", metavar="FILE",
                                         help="Also back up the paths listed in FILE, one a line, # comments."),
    one_file_system: bool = typer.Option(False, "--one-file-system", "-x",
                                         help="Stay on the file systems of PATHs (mount points are kept, empty)."),
    host: str = typer.Option("", "--host", metavar="HOST",
                             help="Hostname recorded in the snapshot (default: this host)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n",
                                 help="Walk and read everything, store nothing; say what would be added."),
    compression: str = CompressionOption,
    workers: int = WorkersOption,
    read_concurrency: int = typer.Option(0, "--read-concurrency", metavar="N", min=0,
                                         help="Read at most N small files at once (the walk reads large ones, one at "
                                              "a time); default: as many as --workers."),
    nice: int | None = NiceOption,
    ionice: str | None = IoniceOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON; with progress and warnings as "
                                                        "JSON lines on stderr."),
    retry_lock: str = RetryLockOption,
) -> None:
    """Back up files and directories; prints the new snapshot's id."""
    lower_priority(nice, ionice)  # before any thread starts: threads inherit it
    paths = list(paths or [])
    for f in files_from:
        paths += _read_list(f, "the --files-from file")
    if not paths:
        raise UsageError("nothing to back up", hint="give PATH... or --files-from FILE")
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{p} does not exist")
    excludes = list(exclude)
    for f in exclude_file:
        excludes += _read_list(f, "the exclude file")
    compiled(tuple(excludes))  # a pattern that names no path is a usage error before anything is read
    options = BackupOptions(paths=paths, tags=tag, excludes=excludes, one_file_system=one_file_system, hostname=host,
                            exclude_caches=exclude_caches, compression=compression_level(compression),
                            exclude_larger_than=parse_size(exclude_larger_than) if exclude_larger_than else None,
                            workers=workers or None, read_concurrency=read_concurrency or None, dry_run=dry_run)
    if "HOZON_STALL_SECONDS" in os.environ:
        options.stall_after = _seconds("HOZON_STALL_SECONDS")
    report = _Report(json_out, quiet, verbose)
    with locked_repo(repo, SHARED, "backup", retry_lock=retry_lock) as repository:
        with saving_snapshot("the backup"):
            if report.bar:
                with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                              console=err_console, transient=True) as bar:
                    task = bar.add_task("scanning")

                    def show(c: BackupCounters) -> None:
                        bar.update(task, description=f"{c.total_files} files, {human_bytes(c.bytes_read)} read  "
                                                     f"[dim]{c.current[-60:]}[/]")

                    result = backup_files(repository, options, show, report.warning)
            else:
                result = backup_files(repository, options, report.progress, report.warning, report.file)
        _render(result, report, dry_run)  # before the lock goes: if removing it fails, the snapshot id is out already
    if result.warnings:
        raise typer.Exit(WARNINGS_EXIT)


def _read_list(path: str, what: str) -> list[str]:
    """The lines of a list file, without blanks and ``#`` comments."""
    try:
        return load_exclude_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc


class _Report:
    """What the user sees while the backup runs: a bar on a terminal, JSON lines, each file, or nothing."""

    def __init__(self, json_out: bool, quiet: bool, verbose: bool) -> None:
        self.json = JsonStatus("backup") if json_out else None
        self.quiet = quiet
        self.verbose = verbose and not quiet and not json_out
        self.bar = interactive() and not (json_out or quiet or self.verbose)
        self.shown: set[str] = set()
        self.progress = self._status if self.json else None

    def _status(self, c: BackupCounters) -> None:
        assert self.json is not None
        self.json.status(files_done=c.total_files, total_files=c.files_seen, bytes_done=c.total_bytes,
                         total_bytes=max(c.bytes_seen, c.expected_bytes), current=[c.current])

    def warning(self, warning: str) -> None:  # a stalled read: named now, while the backup still waits
        self.shown.add(warning)
        if self.json:
            self.json.error(warning)
        else:
            _print_warning(warning)

    def file(self, status: str, path: str) -> None:
        if self.verbose:
            console.print(Text.assemble(f"{status:<10} ", path), soft_wrap=True)


def _render(result: BackupResult, report: _Report, dry_run: bool) -> None:
    snap = result.snapshot
    s = snap.summary
    for w in result.warnings:
        if w not in report.shown:
            report.warning(w)
    if report.json:
        print_json({"snapshot": snap.listing(), "warnings": result.warnings, "dry_run": dry_run})
        return
    if report.quiet:
        return
    console.print(
        f"files: {s['files_new']} new, {s['files_changed']} changed, {s['files_unmodified']} unmodified; "
        f"{s['dirs']} dirs; {human_bytes(s['total_bytes'])} in total"
    )
    added = "would add to the repository" if dry_run else "added to the repository"
    console.print(f"{added}: {human_bytes(s['data_added'])} "
                  f"({human_bytes(s['data_added_stored'])} stored) in {s['duration_s']:.1f} s")
    console.print("dry run: nothing was stored, no snapshot saved" if dry_run else f"snapshot {snap.short_id} saved")
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
