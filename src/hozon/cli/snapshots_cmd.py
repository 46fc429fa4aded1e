"""Looking at snapshots: snapshots, ls, diff."""

from __future__ import annotations

import stat as stat_mod
from datetime import datetime

import typer
from rich.table import Table
from rich.text import Text

from hozon.cli.common import (
    JsonOption,
    NoLockOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    local_time,
    open_for_reading,
    print_json,
)
from hozon.errors import HozonError
from hozon.repo import browse
from hozon.repo.imagediff import ImageDiff, diff_images
from hozon.repo.imagemap import image_disks
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import DIR, SYMLINK


def snapshots(
    ctx: typer.Context,
    repo: str | None = RepoOption,
    json_out: bool = JsonOption,
    host: str = typer.Option("", "--host", metavar="HOST", help="Only snapshots of this host."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Only snapshots with this tag (repeatable: any)."),
    path: list[str] = typer.Option([], "--path", metavar="PATH", help="Only snapshots of this path (repeatable)."),
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """List snapshots, oldest first."""
    repository = open_for_reading(ctx, repo, load_index=False, retry_lock=retry_lock, no_lock=no_lock)
    snaps, damaged = repository.readable_snapshots()
    for problem in damaged:
        err_console.print(f"warning: {problem.message}; it is not listed", markup=False, soft_wrap=True)
    snaps = [s for s in snaps if (not host or s.hostname == host) and (not tag or set(tag) & set(s.tags))
             and (not path or set(path) <= set(s.paths))]
    if json_out:
        print_json([s.listing() for s in snaps])
    else:
        _print_table(snaps)
    if damaged:
        raise typer.Exit(1)


def _print_table(snaps: list[Snapshot]) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "Time", "Host", "Kind", "Tags", "Paths / disks", "Size", "Read"):
        table.add_column(col)
    for s in snaps:
        when = local_time(s.time)
        size = human_bytes(s.summary.get("total_bytes", 0) + s.summary.get("state_bytes", 0))  # a checkpoint's too
        read = human_bytes(s.summary.get("bytes_read", 0))
        what = "\n".join(s.paths)
        if s.tree is None:  # an image snapshot: the VM and its disks (and a checkpoint's state)
            parts = [str(d.get("name")) for d in image_disks(s.extra)] + (["state"] if s.kind == "checkpoint" else [])
            what = f"{s.extra.get('vm')}: {', '.join(parts)}"
        # Text, not markup: a '[' in a tag or path is shown as it is (and '[/]' raised MarkupError).
        table.add_row(s.short_id, when, Text(s.hostname), s.kind, Text(",".join(s.tags)), Text(what), size, read)
    console.print(table)
    console.print(f"{len(snaps)} snapshot(s)")


def ls(
    ctx: typer.Context,
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT", help="Snapshot id, prefix, or 'latest'."),
    path: str = typer.Argument("/", metavar="PATH", help="List below this path only."),
    repo: str | None = RepoOption,
    json_out: bool = JsonOption,
    long: bool = typer.Option(False, "--long", "-l", help="Show mode, owner, size and time."),
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """List the files in a snapshot."""
    repository = open_for_reading(ctx, repo, retry_lock=retry_lock, no_lock=no_lock)
    snap = repository.resolve_snapshot(snapshot)
    if snap.tree is None:
        raise HozonError(f"snapshot {snap.short_id} is a {snap.kind} snapshot and holds no files",
                         hint="use: hozon vm ls")
    start = snap.tree
    prefix = ""
    if path.strip("/"):
        found = browse.find(repository, snap.tree, path)
        if found is None:
            raise HozonError(f"{path} is not in snapshot {snap.short_id}")
        prefix, node = found
        if node.type != DIR or node.subtree is None:
            entries = [(prefix, node)]
            start = ""
        else:
            start = node.subtree
    if start:
        entries = list(browse.walk(repository, start, prefix))
    if json_out:
        print_json([{"path": p, **n.to_json()} for p, n in entries])
        return
    for p, n in entries:
        if not long:
            console.print(p, markup=False)
            continue
        kind = {DIR: "d", SYMLINK: "l"}.get(n.type, "-")
        when = datetime.fromtimestamp(n.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        mode = kind + stat_mod.filemode(n.mode)[1:]
        owner = f"{n.user or n.uid}/{n.group or n.gid}"
        target = f" -> {n.target}" if n.target else ""
        console.print(f"{mode} {owner:>12} {n.size:>12} {when} {p}{target}", markup=False)


def diff(
    ctx: typer.Context,
    first: str = typer.Argument(..., metavar="SNAPSHOT", help="Older snapshot."),
    second: str = typer.Argument(..., metavar="SNAPSHOT", help="Newer snapshot."),
    repo: str | None = RepoOption,
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
    no_lock: bool = NoLockOption,
) -> None:
    """Show what changed between two snapshots (+ added, - removed, M modified, U metadata, T type).

    Between two image snapshots or checkpoints of one VM: each disk's changed regions (at its chunk
    size) and bytes, and for two checkpoints how much of the memory changed.
    """
    repository = open_for_reading(ctx, repo, retry_lock=retry_lock, no_lock=no_lock)
    a, b = repository.resolve_snapshot(first), repository.resolve_snapshot(second)
    if a.tree is None or b.tree is None:
        _render_image_diff(diff_images(repository, a, b), json_out)
        return
    changes = list(browse.diff(repository, a.tree, b.tree))
    if json_out:
        print_json([{"change": c.kind, "path": c.path} for c in changes])
        return
    for c in changes:
        console.print(f"{c.kind} {c.path}", markup=False)
    counts = {k: sum(1 for c in changes if c.kind == k) for k in "+-MUT"}
    console.print(f"{counts['+']} added, {counts['-']} removed, {counts['M']} modified, "
                  f"{counts['U']} metadata changed, {counts['T']} type changed")


MAX_REGIONS_SHOWN = 20


def _render_image_diff(result: ImageDiff, json_out: bool) -> None:
    if json_out:
        print_json({"disks": [{"name": d.name, "status": d.status, "size": d.size, "chunk_size": d.chunk_size,
                               "changed_bytes": d.changed_bytes,
                               "regions": [{"offset": o, "length": n} for o, n in d.regions]} for d in result.disks],
                    "memory": None if result.memory is None else
                    {"size": result.memory.size, "changed_bytes": result.memory.changed_bytes}})
        return
    for d in result.disks:
        if d.status in ("added", "removed"):
            console.print(f"disk {d.name}: {d.status} ({human_bytes(d.size)})", markup=False)
            continue
        console.print(f"disk {d.name}: {d.status}, {human_bytes(d.changed_bytes)} of {human_bytes(d.size)} in "
                      f"{len(d.regions)} region(s) of {human_bytes(d.chunk_size)} chunks", markup=False)
        for offset, length in d.regions[:MAX_REGIONS_SHOWN]:
            console.print(f"  {offset:#014x}-{offset + length:#014x} {human_bytes(length)}", markup=False)
        if len(d.regions) > MAX_REGIONS_SHOWN:
            console.print(f"  … {len(d.regions) - MAX_REGIONS_SHOWN} more (--json lists all)", markup=False)
    if result.memory is not None:
        m = result.memory
        share = m.changed_bytes / m.size if m.size else 0.0
        console.print(f"memory: {human_bytes(m.changed_bytes)} of {human_bytes(m.size)} of state changed "
                      f"({share:.0%})", markup=False)
