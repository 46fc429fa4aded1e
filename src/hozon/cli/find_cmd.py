"""hozon find: which snapshots hold a path, with its size and time."""

from __future__ import annotations

from datetime import datetime

import typer

from hozon.cli.common import (
    JsonOption,
    NoLockOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    local_time,
    print_json,
    reading_repo,
)
from hozon.pathmatch import PatternList
from hozon.repo.search import search
from hozon.repo.tree import DIR


def find(
    pattern: list[str] = typer.Argument(..., metavar="PATTERN...",
                                        help="Names or paths to look for (docs/patterns.md: '*.conf', '/etc/ssh', "
                                             "'sub/**/x')."),
    snapshot: list[str] = typer.Option([], "--snapshot", "-s", metavar="SNAPSHOT",
                                       help="Search only this snapshot (repeatable; default: every file snapshot)."),
    host: str = typer.Option("", "--host", metavar="HOST", help="Only snapshots of this host."),
    path: list[str] = typer.Option([], "--path", metavar="PATH", help="Only snapshots of this path (repeatable)."),
    repo: str | None = RepoOption,
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Find files and directories by name or path across snapshots; prints each with its size and time."""
    patterns = PatternList(pattern)
    with reading_repo(repo, "find", retry_lock=retry_lock, no_lock=no_lock) as repository:
        if snapshot:
            snaps = [repository.resolve_snapshot(ref) for ref in snapshot]
        else:
            snaps, damaged = repository.readable_snapshots()
            for problem in damaged:
                err_console.print(f"warning: {problem.message}; it is not searched", markup=False, soft_wrap=True)
        snaps = [s for s in snaps if (not host or s.hostname == host) and set(path) <= set(s.paths)]
        images = sum(1 for s in snaps if s.tree is None)
        found = search(repository, snaps, patterns)
    if json_out:
        print_json([{"snapshot": f.snapshot.id, "time": f.snapshot.time, "hits": [
            {"path": h.path, "type": h.node.type, "size": h.node.size, "mode": h.node.mode,
             "mtime": datetime.fromtimestamp(h.node.mtime_ns / 1e9).astimezone().isoformat()} for h in f.hits]}
            for f in found])
    else:
        for f in found:
            console.print(f"snapshot {f.snapshot.short_id} of {f.snapshot.hostname} at "
                          f"{local_time(f.snapshot.time)}:", markup=False)
            for h in f.hits:
                when = datetime.fromtimestamp(h.node.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
                size = "-" if h.node.type == DIR else human_bytes(h.node.size)
                console.print(f"  {size:>10}  {when}  {h.path}{'/' if h.node.type == DIR else ''}", markup=False)
    if images:
        err_console.print(f"note: {images} VM snapshot(s) not searched: their files are inside disk images",
                          markup=False)
    if not found:
        err_console.print(f"no snapshot holds a path matching {' '.join(pattern)}", markup=False, soft_wrap=True)
