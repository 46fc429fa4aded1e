"""hozon stats: how big snapshots are when restored, and what they take in the repository."""

from __future__ import annotations

import typer

from hozon.cli.common import (
    JsonOption,
    NoLockOption,
    RepoOption,
    RetryLockOption,
    console,
    human_bytes,
    print_json,
    reading_repo,
)
from hozon.errors import UsageError
from hozon.repo.stats import MODES, RAW_DATA, RESTORE_SIZE, snapshot_stats


def stats(
    snapshot: list[str] = typer.Argument(None, metavar="[SNAPSHOT]...",
                                         help="Snapshots to count (default: every snapshot)."),
    repo: str | None = RepoOption,
    mode: str = typer.Option(RESTORE_SIZE, "--mode", metavar="MODE",
                             help="restore-size: what restoring them writes; raw-data: the unique blobs they "
                                  "reference, stored and uncompressed, with the deduplication and compression "
                                  "ratios (default: restore-size)."),
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Show the restore size of snapshots, or (--mode raw-data) what they take in the repository."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", hint="use one of: " + ", ".join(MODES))
    with reading_repo(repo, "stats", retry_lock=retry_lock, no_lock=no_lock) as repository:
        if snapshot:
            snaps = [repository.resolve_snapshot(ref) for ref in snapshot]
        else:
            snaps, damaged = repository.readable_snapshots()
            if damaged:
                raise damaged[0]
        result = snapshot_stats(repository, snaps, mode)
    if json_out:
        print_json(result.to_json(mode))
        return
    console.print(f"snapshots: {result.snapshots}")
    console.print(f"files: {result.files}; disk images and VM states: {result.disks}")
    console.print(f"restore size: {human_bytes(result.restore_size)}")
    if mode == RAW_DATA:
        blobs = ", ".join(f"{n} {kind}" for kind, n in result.blobs.items())
        console.print(f"unique blobs: {sum(result.blobs.values())} ({blobs})")
        console.print(f"raw data: {human_bytes(result.raw_size)}; stored: {human_bytes(result.stored_size)}")
        console.print(f"compression ratio: {result.compression_ratio:.2f}x; "
                      f"deduplication ratio: {result.dedup_ratio:.2f}x")
