"""Which snapshots hold a path: ``hozon find``, with the patterns of docs/patterns.md.

An entry is found when the patterns name it (a match does not take a directory's contents here:
``*.conf`` lists ``x.conf/`` and ``x.conf/y.conf``, not every file below ``x.conf/``). The walk carries
the matcher's state from each directory to its children, so it leaves a subtree as soon as nothing
below can match; a directory tree met again under the same path in a later snapshot is not walked
again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hozon.pathmatch import PatternList, Positions
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.repo.tree import DIR, Node


@dataclass(frozen=True)
class Hit:
    path: str
    node: Node


@dataclass
class SnapshotHits:
    snapshot: Snapshot
    hits: list[Hit] = field(default_factory=list)


def search(repo: Repository, snapshots: Iterable[Snapshot], patterns: PatternList) -> list[SnapshotHits]:
    """The entries of file snapshots matching ``patterns``, per snapshot (those with hits), in path order."""
    cache: dict[tuple[str, str], list[Hit]] = {}  # (tree id, path) → hits below it
    found = []
    for snap in snapshots:
        if snap.tree is None:
            continue
        root: Positions = tuple(s for s in patterns.root() if s is not None)
        hits = _tree_hits(repo, snap.tree, "", root, patterns, cache)
        if hits:
            found.append(SnapshotHits(snap, hits))
    return found


def _tree_hits(repo: Repository, tree_id: str, prefix: str, state: Positions, patterns: PatternList,
               cache: dict[tuple[str, str], list[Hit]]) -> list[Hit]:
    """Hits below one directory, with an explicit stack (trees may be thousands of levels deep)."""
    result: list[Hit] = []
    # Each frame: the hits list it fills, the directory's path and state, its nodes, and where its own
    # result goes in the cache once complete.
    stack = [(result, prefix, state, iter(repo.load_tree(tree_id)), (tree_id, prefix))]
    while stack:
        hits, path, dir_state, nodes, key = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            cache[key] = hits
            if stack:
                stack[-1][0].extend(hits)
            continue
        child_path = f"{path}/{node.name}"
        child_state = patterns.entry_child(dir_state, node.name)
        named, descend = patterns.entry_verdict(child_state)
        if named:
            hits.append(Hit(child_path, node))
        if node.type == DIR and node.subtree and descend:
            cached = cache.get((node.subtree, child_path))
            if cached is not None:
                hits.extend(cached)
            else:
                stack.append(([], child_path, child_state, iter(repo.load_tree(node.subtree)),
                              (node.subtree, child_path)))
    return result
