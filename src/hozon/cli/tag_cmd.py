"""hozon tag: add, remove or set the tags of snapshots."""

from __future__ import annotations

import typer

from hozon.cli.common import JsonOption, RepoOption, RetryLockOption, console, locked_repo, print_json
from hozon.errors import UsageError
from hozon.repo.locks import PRUNE
from hozon.repo.retag import new_tags, retag


def tag(
    snapshot: list[str] = typer.Argument(..., metavar="SNAPSHOT...", help="Snapshot ids, prefixes or 'latest'."),
    repo: str | None = RepoOption,
    add: list[str] = typer.Option([], "--add", metavar="TAG", help="Add TAG (repeatable)."),
    remove: list[str] = typer.Option([], "--remove", metavar="TAG", help="Remove TAG (repeatable)."),
    set_: list[str] = typer.Option([], "--set", metavar="TAG",
                                   help="Replace all tags by these (repeatable; --set '' removes every tag)."),
    json_out: bool = JsonOption,
    retry_lock: str = RetryLockOption,
) -> None:
    """Change snapshots' tags; each changed snapshot gets a new id (its file is written anew)."""
    if set_ and (add or remove):
        raise UsageError("--set replaces every tag; give it alone, or use --add and --remove")
    if not (set_ or add or remove):
        raise UsageError("nothing to change", hint="give --add TAG, --remove TAG or --set TAG")
    replace = [t for t in set_ if t] if set_ else None
    changes: list[dict[str, object]] = []
    # A prune lock: forget must not delete the old file while the new one is written (it would come back).
    with locked_repo(repo, PRUNE, "tag", load_index=False, retry_lock=retry_lock) as repository:
        chosen = {s.id: s for s in (repository.resolve_snapshot(ref) for ref in snapshot)}
        for snap in chosen.values():
            tags = new_tags(snap.tags, add, remove, replace)
            copy = retag(repository, snap, tags)
            changes.append({"old": snap.id, "new": copy.id if copy else snap.id, "tags": tags,
                            "changed": copy is not None})
    if json_out:
        print_json(changes)
        return
    for c in changes:
        old, new = str(c["old"])[:8], str(c["new"])[:8]
        shown = ",".join(c["tags"]) if isinstance(c["tags"], list) else ""
        what = f"now {new} with tags {shown or '(none)'}" if c["changed"] else "unchanged"
        console.print(f"snapshot {old}: {what}", markup=False)
