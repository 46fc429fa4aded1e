"""hozon copy: copy snapshots into another repository, sending only the blobs it lacks."""

from __future__ import annotations

import os

import typer

from hozon.cli.common import (
    JsonOption,
    RetryLockOption,
    console,
    open_repo,
    parse_duration,
    print_json,
)
from hozon.cli.password import agent_password, read_password, read_password_file
from hozon.errors import UsageError
from hozon.repo.backends import Backend, open_backend
from hozon.repo.backends.retain import retaining
from hozon.repo.copy import copy_snapshots
from hozon.repo.locks import SHARED, Lock
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot


def copy(
    snapshot: list[str] = typer.Argument(None, metavar="[SNAPSHOT...]",
                                         help="Snapshot ids, prefixes or 'latest' (default: every snapshot)."),
    source: str | None = typer.Option(None, "--from", envvar="HOZON_REPO", metavar="REPO",
                                      help="The repository to copy from (default: HOZON_REPO); its password "
                                           "from HOZON_PASSWORD or HOZON_PASSWORD_FILE."),
    target: str = typer.Option(..., "--to", metavar="REPO",
                               help="The repository to copy into; its password from HOZON_TO_PASSWORD or "
                                    "HOZON_TO_PASSWORD_FILE (default: an enrolled agent's for its "
                                    "server, else the source's)."),
    latest_per_vm: bool = typer.Option(False, "--latest-per-vm", help="Copy the newest snapshot of each VM."),
    lock_days: int = typer.Option(0, "--lock-days", min=0, metavar="N",
                                  help="S3 targets: keep what is copied under Object Lock (compliance) for N days: "
                                       "nobody, Hozon included, can delete it sooner."),
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Copy snapshots between repositories (local, S3, a Hozon server); run again, it copies only new ones."""
    if snapshot and latest_per_vm:
        raise UsageError("give snapshots or --latest-per-vm, not both")
    retry_for = parse_duration(retry_lock)
    from_repo = open_repo(source, load_index=False)
    to_backend = open_backend(target)
    to_repo = Repository.open(to_backend, _target_password(to_backend))
    if lock_days:
        to_repo.backend = retaining(to_repo.backend, lock_days)
    with Lock(from_repo, SHARED, "copy", retry_for), Lock(to_repo, SHARED, "copy", retry_for):
        from_repo.load_index()
        to_repo.load_index()
        chosen = _choose(from_repo, snapshot or [], latest_per_vm)
        result = copy_snapshots(from_repo, to_repo, chosen, say=lambda m: console.print(m, markup=False)
                                if not json_out else None)
    if json_out:
        print_json({"copied": [{"source": s, "target": t} for s, t in result.copied],
                    "skipped": [{"source": s, "target": t} for s, t in result.skipped],
                    "blobs_new": result.stats.blobs_new, "bytes_stored": result.stats.bytes_stored})
        return
    for s, t in result.copied:
        console.print(f"snapshot {s[:8]} copied as {t[:8]}", markup=False)
    for s, t in result.skipped:
        console.print(f"snapshot {s[:8]} was copied earlier as {t[:8]}", markup=False)
    console.print(f"{result.stats.blobs_new} new blob(s), {result.stats.bytes_stored} bytes stored; "
                  "the copies were verified", markup=False)


def _target_password(backend: Backend) -> str | None:
    """HOZON_TO_PASSWORD(_FILE), else an enrolled agent's for its server, else the source's password."""
    if "HOZON_TO_PASSWORD" in os.environ:
        return os.environ["HOZON_TO_PASSWORD"]
    path = os.environ.get("HOZON_TO_PASSWORD_FILE")
    if path:
        return read_password_file(path)
    return agent_password(backend) or read_password(required=False)


def _choose(repo: Repository, refs: list[str], latest_per_vm: bool) -> list[Snapshot]:
    if refs:
        return list({s.id: s for s in (repo.resolve_snapshot(ref) for ref in refs)}.values())
    snaps = repo.list_snapshots()
    if not latest_per_vm:
        return snaps
    newest: dict[str, Snapshot] = {}
    for snap in sorted(snaps, key=lambda s: s.time):
        if snap.kind != "files" and isinstance(snap.extra.get("vm"), str):
            newest[snap.extra["vm"]] = snap
    return list(newest.values())
