"""hozon dump: one file of a snapshot to stdout, or a directory as a tar stream."""

from __future__ import annotations

import os
import sys

import typer

from hozon.cli.common import NoLockOption, RepoOption, RetryLockOption, reading_repo
from hozon.errors import HozonError, UsageError
from hozon.repo import browse
from hozon.repo.tree import DIR, FILE, Node
from hozon.restore.dump import dump_tar, file_bytes


def dump(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Snapshot id, prefix, or 'latest'."),
    path: str = typer.Argument(..., metavar="PATH", help="A file (written as it is) or directory (as tar)."),
    repo: str | None = RepoOption,
    archive: bool = typer.Option(False, "--archive", help="Write a tar archive even when PATH is one file."),
    target: str = typer.Option("", "--target", "-t", metavar="FILE",
                               help="Write to FILE instead of standard output (default: standard output)."),
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Write a file of a snapshot to standard output, or a directory as a tar archive (like restic dump)."""
    out_file = None
    if target:
        try:
            out_file = open(target, "xb")  # noqa: SIM115 - closed below, after the stream is complete
        except OSError as exc:
            raise UsageError(f"cannot create {target}: {exc.strerror}",
                             hint="--target names a new file; it never replaces one") from exc
    elif sys.stdout.isatty():
        raise UsageError("standard output is a terminal", hint="redirect it (> FILE, | tar x) or use --target FILE")
    out = out_file or sys.stdout.buffer
    try:
        with reading_repo(repo, "dump", retry_lock=retry_lock, no_lock=no_lock) as repository:
            snap = repository.resolve_snapshot(snapshot)
            if snap.tree is None:
                raise HozonError(f"snapshot {snap.short_id} is a {snap.kind} snapshot and holds no files",
                                 hint="restore a disk image with: hozon vm restore")
            found = (("/", Node(name="", type=DIR, subtree=snap.tree)) if not path.strip("/")
                     else browse.find(repository, snap.tree, path))
            if found is None:
                raise HozonError(f"{path} is not in snapshot {snap.short_id}")
            _path, node = found
            if node.type == FILE and not archive:
                for piece in file_bytes(repository, node):
                    out.write(piece)
            elif node.type == DIR or archive:
                dump_tar(repository, found, out)
            else:
                raise HozonError(f"{path} is a {node.type}, not a file or directory", hint="dump it with --archive")
            out.flush()
    except BaseException:
        if out_file is not None:  # a half-written file must not look like a dump
            out_file.close()
            os.unlink(target)
        raise
    if out_file is not None:
        out_file.close()
