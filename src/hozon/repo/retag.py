"""Changing a snapshot's tags without breaking write-once: a new snapshot file replaces the old one.

The new file differs from the old only in its tags (so it gets a new id, as in restic); it is
written before the old one is removed, so a crash in between leaves both, never neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot


def new_tags(current: Sequence[str], add: Sequence[str], remove: Sequence[str],
             replace: Sequence[str] | None) -> list[str]:
    """The tags after ``--set`` (``replace``) or ``--add``/``--remove``, sorted and without repeats."""
    tags = set(replace) if replace is not None else (set(current) | set(add)) - set(remove)
    return sorted(tags)


def retag(repo: Repository, snapshot: Snapshot, tags: list[str]) -> Snapshot | None:
    """Replace ``snapshot`` by a copy with ``tags``; the copy, or None when the tags do not change."""
    if sorted(snapshot.tags) == tags:
        return None
    copy = dataclasses.replace(snapshot, tags=tags, id="")
    repo.save_snapshot(copy)
    if copy.id != snapshot.id:
        repo.delete_snapshot(snapshot.id)
    return copy
