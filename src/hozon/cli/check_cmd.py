"""hozon check: verify the repository's structure, and with --read-data every byte of it."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hozon.cli.common import (
    JsonOption,
    NoLockOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    interactive,
    print_json,
    reading_repo,
)
from hozon.repo.check import CheckProgress, CheckResult, DataSubset, check_repository

ERRORS_EXIT = 1

_PHASES = {"index": "loading index", "packs": "listing packs", "read-data": "reading packs",
           "snapshots": "checking snapshots"}


def check(
    repo: str | None = RepoOption,
    read_data: bool = typer.Option(
        False, "--read-data", help="Also read every pack and verify every blob (reads the whole repository)."
    ),
    read_data_subset: str = typer.Option(
        "", "--read-data-subset", metavar="N/M|N%",
        help="Like --read-data, for part of the packs: N/M reads group N of M (the same packs each time: run "
             "1/7 … 7/7 on seven nights to read everything once a week), N% a random N percent.",
    ),
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Check the repository: every index, pack and snapshot is there and readable; exit 1 on damage."""
    subset = DataSubset.parse(read_data_subset) if read_data_subset else None
    read_data = read_data or subset is not None
    with reading_repo(repo, "check", load_index=False, retry_lock=retry_lock, no_lock=no_lock) as repository:
        if interactive() and not json_out:
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                          TimeElapsedColumn(), console=err_console, transient=True) as bar:
                task = bar.add_task("checking", total=None, detail="")

                def show(p: CheckProgress) -> None:
                    detail = f"{p.done}/{p.total}" if p.total else f"{p.done}"
                    if p.bytes_done:
                        detail += f"  {human_bytes(p.bytes_done)}"
                    bar.update(task, description=_PHASES.get(p.phase, p.phase), completed=p.done,
                               total=p.total or None, detail=detail)

                result = check_repository(repository, read_data=read_data, progress=show, subset=subset)
        else:
            result = check_repository(repository, read_data=read_data, subset=subset)
    if json_out:
        print_json(_as_json(result))
    else:
        _render(result, read_data, subset)
    if not result.ok:
        raise typer.Exit(ERRORS_EXIT)


def _as_json(result: CheckResult) -> dict[str, object]:
    return {
        "errors": list(result.errors),
        "notes": list(result.notes),
        "damaged_packs": list(result.damaged_packs),
        "missing_packs": list(result.missing_packs),
        "affected": [{"snapshot": a.snapshot, "paths": list(a.paths), "more_paths": a.more}
                     for a in result.affected],
        "checked": {"index_files": result.index_files, "packs": result.packs, "snapshots": result.snapshots,
                    "packs_read": result.packs_read, "bytes_read": result.bytes_read},
    }


def _render(result: CheckResult, read_data: bool, subset: DataSubset | None) -> None:
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)  # no wrapping: names stay whole

    for error in result.errors:
        say(f"error: {error}")
    for note in result.notes:
        say(f"note: {note}")
    checked = f"checked {result.index_files} index file(s), {result.packs} pack(s), {result.snapshots} snapshot(s)"
    if read_data:
        checked += f"; read {result.packs_read} pack(s), {human_bytes(result.bytes_read)}"
        if subset is not None:
            checked += f" (subset {subset.describe()})"
    say(checked)
    say("no errors were found" if result.ok else f"{len(result.errors)} error(s) found")
