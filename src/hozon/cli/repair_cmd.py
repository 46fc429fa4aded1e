"""hozon repair index and hozon repair snapshots: bring a damaged repository back to one that checks clean."""

from __future__ import annotations

from typing import Any

import typer

from hozon.cli.common import (
    JsonOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    interactive,
    local_time,
    locked_repo,
    print_json,
)
from hozon.repo.locks import EXCLUSIVE, SHARED
from hozon.repo.repair import IndexRepair, SnapshotRepair, SnapshotsRepair, repair_index, repair_snapshots

WARNINGS_EXIT = 3

repair_app = typer.Typer(help="Repair a damaged repository (run hozon check first).", no_args_is_help=True)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # paths stay whole, '[' stays '['


@repair_app.command("index")
def index(repo: str | None = RepoOption, json_out: bool = JsonOption, retry_lock: str = RetryLockOption) -> None:
    """Rebuild the index from the packs' headers (reads every pack); unreadable packs are reported."""
    def progress(message: str) -> None:
        if interactive() and not json_out:
            err_console.print(f"{message}…", markup=False, style="dim")

    with locked_repo(repo, EXCLUSIVE, "repair index", load_index=False, retry_lock=retry_lock) as repository:
        result = repair_index(repository, progress)
    if json_out:
        print_json(_index_doc(result))
    else:
        _render_index(result)
    if result.unreadable:
        raise typer.Exit(WARNINGS_EXIT)


def _index_doc(result: IndexRepair) -> dict[str, Any]:
    return {"packs": result.packs, "blobs": result.blobs, "unreadable_packs": list(result.unreadable),
            "dropped_packs": list(result.dropped), "damaged_index_files": list(result.damaged_index_files),
            "index_written": result.written, "index_removed": result.removed}


def _render_index(result: IndexRepair) -> None:
    for problem in result.damaged_index_files:
        _say(f"replaced: {problem}")
    for problem in result.unreadable:
        _say(f"warning: left out of the index: {problem}")
    if result.dropped:
        _say(f"dropped {len(result.dropped)} pack(s) the index named that are not in the repository: "
             + ", ".join(name[:16] for name in result.dropped))
    _say(f"indexed {result.blobs} blob(s) in {result.packs} pack(s): {result.written} index file(s) written, "
         f"{result.removed} removed")
    if result.unreadable or result.dropped:
        _say("snapshots that used what is gone: hozon repair snapshots")


@repair_app.command("snapshots")
def snapshots(
    repo: str | None = RepoOption,
    forget: bool = typer.Option(False, "--forget", help="Remove each original once its repaired copy is saved."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Show what would happen; change nothing."),
    read_data: bool = typer.Option(False, "--read-data",
                                   help="Also read every pack: blobs that fail their checks count as lost."),
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Save damaged file snapshots again without what is lost: files left out, lost directories empty.

    The new snapshot keeps the original's time, host, paths and tags and adds the tag 'repaired'.
    Image snapshots (VMs) are not repaired. Run hozon repair index first if the index is damaged.
    """
    with locked_repo(repo, SHARED if dry_run else EXCLUSIVE, "repair snapshots", load_index=False,
                     retry_lock=retry_lock) as repository:
        result = repair_snapshots(repository, dry_run=dry_run, forget=forget, read_data=read_data)
    if json_out:
        print_json(_snapshots_doc(result))
    else:
        _render_snapshots(result, forget)
    if result.warnings:
        raise typer.Exit(WARNINGS_EXIT)


def _snapshots_doc(result: SnapshotsRepair) -> dict[str, Any]:
    def one(item: SnapshotRepair) -> dict[str, Any]:
        return {"snapshot": item.original.id, "refused": item.refused or None,
                "repaired": (item.repaired.id or None) if item.repaired else None,
                "changes": [{"path": c.path, "what": c.what} for c in item.changes]}

    return {"dry_run": result.dry_run, "snapshots": [one(item) for item in result.snapshots],
            "unreadable_snapshots": result.unreadable, "dropped_packs": result.dropped_packs,
            "damaged_packs": result.damaged_packs,
            "forgotten": result.forgotten}


def _render_snapshots(result: SnapshotsRepair, forget: bool) -> None:
    would = "would be " if result.dry_run else ""
    for problem in result.unreadable:
        _say(f"warning: {problem}; it cannot be repaired")
    for item in result.snapshots:
        snap = item.original
        _say(f"snapshot {snap.short_id} ({local_time(snap.time)}, {snap.hostname}, {', '.join(snap.paths)}):")
        if item.refused:
            _say(f"  warning: not repaired: {item.refused}")
            continue
        if item.repaired and not item.changes:
            _say(f"  repaired before as {item.repaired.short_id}")
            continue
        for change in item.changes:
            _say(f"  {change.path}: {change.what}")
        saved = f"saved as {item.repaired.short_id}" if item.repaired and item.repaired.id else "saved"
        _say(f"  {would}{saved} with the tag repaired")
    if not result.snapshots and not result.unreadable:
        _say("no snapshot needs repair")
    if result.dropped_packs:
        _say(f"{len(result.dropped_packs)} missing pack(s) {would}dropped from the index")
    if result.damaged_packs:
        _say(f"{len(result.damaged_packs)} pack(s) hold damaged blobs; once the originals are gone, "
             "hozon prune --repack-threshold 1 copies what is good out of them and deletes them")
    repaired = [item for item in result.snapshots if not item.refused]
    if result.forgotten:
        _say(f"{len(result.forgotten)} original snapshot(s) {would}removed")
    elif repaired and not forget:
        _say("the originals are kept; remove them with --forget (or hozon forget ID)")
    if result.dry_run:
        _say("dry run: nothing was written or deleted")
