"""hozon forget and hozon prune: drop snapshots by a retention policy, then give their space back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from hozon.cli.common import (
    JsonOption,
    RepoOption,
    RetryLockOption,
    console,
    err_console,
    human_bytes,
    interactive,
    local_time,
    open_repo,
    parse_duration,
    print_json,
)
from hozon.errors import UsageError
from hozon.repo.locks import PRUNE, Lock
from hozon.repo.prune import DEFAULT_REPACK_THRESHOLD, PrunePlan, PruneResult, execute_prune, plan_prune
from hozon.repo.repository import Repository
from hozon.repo.retention import Decision, Duration, Group, Retention, parse_group_by, plan_forget
from hozon.repo.snapshots import Snapshot

RepackOption = typer.Option(
    DEFAULT_REPACK_THRESHOLD, "--repack-threshold", metavar="FRACTION", min=0.0, max=1.0,
    help=f"Repack a pack when less than this fraction of its bytes is still used. Default: {DEFAULT_REPACK_THRESHOLD}.",
)
DryRunOption = typer.Option(False, "--dry-run", "-n", help="Show what would happen; change nothing.")


def forget(
    snapshot_ids: list[str] | None = typer.Argument(
        None, metavar="SNAPSHOT",
        help="Forget exactly these snapshots (id, unique prefix or 'latest') instead of a policy.",
    ),
    repo: str | None = RepoOption,
    keep_last: int = typer.Option(0, "--keep-last", metavar="N", help="Keep the N newest snapshots."),
    keep_hourly: int = typer.Option(0, "--keep-hourly", metavar="N", help="Keep the newest of each of N hours."),
    keep_daily: int = typer.Option(0, "--keep-daily", metavar="N", help="Keep the newest of each of N days."),
    keep_weekly: int = typer.Option(0, "--keep-weekly", metavar="N", help="Keep the newest of each of N ISO weeks."),
    keep_monthly: int = typer.Option(0, "--keep-monthly", metavar="N", help="Keep the newest of each of N months."),
    keep_yearly: int = typer.Option(0, "--keep-yearly", metavar="N", help="Keep the newest of each of N years."),
    keep_tag: list[str] = typer.Option([], "--keep-tag", metavar="TAG", help="Keep snapshots with this tag."),
    keep_within: str = typer.Option(
        "", "--keep-within", metavar="DURATION",
        help="Keep every snapshot made within DURATION (1y6m, 14d, 2d12h) before the group's newest one.",
    ),
    group_by: str = typer.Option(
        "host,paths", "--group-by", metavar="FIELDS",
        help="Apply the policy per group of host, paths, tags ('' for one group). Default: host,paths."
    ),
    host: str = typer.Option("", "--host", metavar="HOST", help="Only consider snapshots of this host."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG",
                                  help="Only consider snapshots with this tag (repeatable: any)."),
    path: list[str] = typer.Option([], "--path", metavar="PATH",
                                   help="Only consider snapshots of this path or VM (repeatable: all of them)."),
    dry_run: bool = DryRunOption,
    prune: bool = typer.Option(False, "--prune", help="Run prune afterwards to give the space back."),
    repack_threshold: float = RepackOption,
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Remove snapshots by a retention policy (or by id); the data goes with the next prune."""
    ids = snapshot_ids or []
    within = Duration.parse(keep_within) if keep_within else Duration()
    policy = Retention(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, tuple(keep_tag),
                       within)
    if ids and (not policy.empty or host or tag or path):
        raise UsageError("give either snapshot ids or a --keep-* policy (with --host/--tag/--path), not both")
    if not ids and policy.empty:
        raise UsageError("no --keep-* option given: this policy would remove every snapshot",
                         hint="give a policy such as --keep-last 7 --keep-daily 14, or the ids to forget")
    fields = parse_group_by(group_by)
    repository = open_repo(repo, load_index=False)
    doc: dict[str, Any] = {"dry_run": dry_run}
    with Lock(repository, PRUNE, "forget", parse_duration(retry_lock)):
        groups: list[Group] = []
        if ids:
            chosen = {s.id: s for s in (repository.resolve_snapshot(ref) for ref in ids)}
            remove = sorted(chosen.values(), key=lambda s: s.datetime)
        else:
            snaps = [s for s in repository.list_snapshots()
                     if (not host or s.hostname == host) and (not tag or set(tag) & set(s.tags))
                     and set(path) <= set(s.paths)]
            groups = plan_forget(snaps, policy, fields)
            remove = [d.snapshot for g in groups for d in g.removed]
        doc["groups"] = [{"group": g.key.as_dict(), "keep": [_decision_doc(d) for d in g.kept],
                          "remove": [_decision_doc(d) for d in g.removed]} for g in groups]
        doc["removed"] = [s.id for s in remove]
        if not json_out:
            _print_forget(groups, remove, dry_run)
        if not dry_run:
            for snap in remove:
                repository.delete_snapshot(snap.id)
        if prune:
            doc["prune"] = _prune(repository, dry_run, repack_threshold, json_out, ignore=doc["removed"])
    if json_out:
        print_json(doc)


def prune(
    repo: str | None = RepoOption,
    dry_run: bool = DryRunOption,
    repack_threshold: float = RepackOption,
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Delete data no snapshot uses and repack partly used packs; safe while backups run."""
    repository = open_repo(repo, load_index=False)
    with Lock(repository, PRUNE, "prune", parse_duration(retry_lock)):
        doc = _prune(repository, dry_run, repack_threshold, json_out)
    if json_out:
        print_json(doc)


# -- forget output --------------------------------------------------------------------------------
def _decision_doc(d: Decision) -> dict[str, Any]:
    return {**d.snapshot.listing(), "reasons": list(d.reasons)}


def _snapshot_table(decisions: Iterable[tuple[Snapshot, str]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "Time", "Host", "Tags", "Paths", "Reasons"):
        table.add_column(col)
    for snap, reasons in decisions:
        when = local_time(snap.time)
        cells = (snap.short_id, when, snap.hostname, ",".join(snap.tags), "\n".join(snap.paths), reasons)
        table.add_row(*(escape(c) for c in cells))
    return table


def _print_forget(groups: list[Group], remove: list[Snapshot], dry_run: bool) -> None:
    for group in groups:
        console.print(f"[bold]{escape(group.key.describe())}[/]")
        kept, removed = group.kept, group.removed
        console.print(f"keep {len(kept)} snapshot(s):")
        if kept:
            console.print(_snapshot_table((d.snapshot, ", ".join(d.reasons)) for d in kept))
        console.print(f"remove {len(removed)} snapshot(s):")
        if removed:
            console.print(_snapshot_table((d.snapshot, "") for d in removed))
        console.print()
    if not groups and remove:
        console.print(_snapshot_table((s, "named on the command line") for s in remove))
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(remove)} snapshot(s){' (dry run: nothing changed)' if dry_run else ''}")


# -- prune ----------------------------------------------------------------------------------------
def _prune(
    repository: Repository, dry_run: bool, threshold: float, json_out: bool, ignore: Iterable[str] = ()
) -> dict[str, Any]:
    def progress(message: str) -> None:
        if interactive() and not json_out:
            err_console.print(f"[dim]{message}…[/]")

    plan = plan_prune(repository, threshold, ignore_snapshots=ignore, progress=progress)
    if not json_out:
        _print_plan(plan)
    result = None if dry_run else execute_prune(repository, plan, progress=progress)
    if not json_out:
        if result is None:
            console.print("dry run: nothing was written or deleted")
        else:
            _print_result(plan, result)
    return {"dry_run": dry_run, "plan": plan.summary(), "result": result.summary() if result else None}


def _print_plan(plan: PrunePlan) -> None:
    console.print(f"prune plan: {len(plan.snapshot_ids)} snapshot(s), {len(plan.packs)} pack(s) "
                  f"({human_bytes(plan.size_of(plan.packs))})")
    table = Table(box=None, show_header=False, pad_edge=False)
    for _ in range(4):
        table.add_column()

    def row(label: str, names: list[str], note: str, always: bool = False) -> None:
        if names or always:
            table.add_row(label, f"{len(names)} pack(s)", human_bytes(plan.size_of(names)), note)

    row("keep", plan.keep, "in use", always=True)
    row("repack", plan.repack, f"partly used: copy {human_bytes(plan.copy_bytes)}, "
        f"threshold {plan.threshold:.0%}")
    row("condemn", plan.condemn, "no snapshot uses them")
    row("resurrect", plan.resurrect, "condemned earlier, in use again")
    row("delete", plan.delete, "condemned earlier; no running backup can need them")
    row("waiting", plan.waiting, "condemned earlier; a backup that started before may need them")
    row("unindexed", [r.name for r in plan.adopt_live], "in no index but in use: indexed")
    row("unindexed", [r.name for r in plan.adopt_condemned], "in no index, unused (left by a stopped backup?)")
    if plan.unreadable:
        table.add_row("unreadable", f"{len(plan.unreadable)} pack(s)", "", "in no index, header unreadable: left")
    if plan.missing:
        table.add_row("missing", f"{len(plan.missing)} pack(s)", "", "indexed but gone, unused: dropped")
    if plan.stale_uploads:
        table.add_row("tmp", f"{plan.stale_uploads} upload(s)", "", "interrupted writes older than a day")
    console.print(table)
    if plan.newly_condemned:
        when = "in this run" if not plan.blockers else "by a later prune, once these end"
        console.print(f"newly unused packs are deleted {when}")
        for lk in plan.blockers:
            console.print(f"  {lk.describe()}", markup=False)


def _print_result(plan: PrunePlan, result: PruneResult) -> None:
    if plan.repack:
        console.print(f"repacked {len(plan.repack)} pack(s) into {result.packs_written} new pack(s) "
                      f"({human_bytes(result.bytes_copied)} copied)")
    if result.index_written or result.index_deleted:
        console.print(f"index: {result.index_written} file(s) written, {result.index_deleted} removed")
    console.print(f"deleted {result.packs_deleted} pack(s), {human_bytes(result.bytes_freed)} freed")
    if result.tmp_deleted:
        console.print(f"removed {result.tmp_deleted} old temporary file(s)")
    if result.condemned_kept:
        console.print(f"{result.condemned_kept} condemned pack(s) stay until a later prune, because of:")
        for reason in result.held_by:
            console.print(f"  {reason}", markup=False)
