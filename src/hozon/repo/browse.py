"""Reading file snapshots as paths: listing (``hozon ls``) and comparing (``hozon diff``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hozon.repo.repository import Repository
from hozon.repo.tree import DIR, Node


def walk(repo: Repository, tree_id: str, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every (path, node) below a tree, parents before children, in name order.

    A stack of open directories, not recursion: a snapshot may be thousands of levels deep.
    """
    stack = [(prefix, iter(repo.load_tree(tree_id)))]
    while stack:
        parent, nodes = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        path = f"{parent}/{node.name}"
        yield path, node
        if node.type == DIR and node.subtree:
            stack.append((path, iter(repo.load_tree(node.subtree))))


def find(repo: Repository, tree_id: str, path: str) -> tuple[str, Node] | None:
    """The node at ``path`` (absolute, as stored) in a tree, or None."""
    parts = [p for p in path.split("/") if p]
    current: Node | None = None
    subtree: str | None = tree_id
    for part in parts:
        if subtree is None:
            return None
        current = next((n for n in repo.load_tree(subtree) if n.name == part), None)
        if current is None:
            return None
        subtree = current.subtree
    return ("/" + "/".join(parts), current) if current is not None else None


@dataclass(frozen=True)
class Change:
    kind: str  # "+" added, "-" removed, "M" content changed, "U" metadata only, "T" type changed
    path: str


Pair = tuple[str | None, str | None, str]  # an old and a new tree to compare, and their path


def diff(repo: Repository, old_tree: str | None, new_tree: str | None, prefix: str = "") -> Iterator[Change]:
    """Changes between two trees, parents before children; identical subtrees are skipped without being read.

    A stack of directories being compared, not recursion: a snapshot may be thousands of levels deep.
    """
    stack = [_compare(repo, (old_tree, new_tree, prefix))]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            continue
        change, below = step
        if change is not None:
            yield change
        if below is not None:
            stack.append(_compare(repo, below))


def _compare(repo: Repository, pair: Pair) -> Iterator[tuple[Change | None, Pair | None]]:
    """One directory's changes in name order, each with the subtrees to compare below it (if any)."""
    old_tree, new_tree, prefix = pair
    if old_tree == new_tree:
        return
    old = {n.name: n for n in repo.load_tree(old_tree)} if old_tree else {}
    new = {n.name: n for n in repo.load_tree(new_tree)} if new_tree else {}
    for name in sorted(old.keys() | new.keys()):
        path = f"{prefix}/{name}"
        a, b = old.get(name), new.get(name)
        if a is None and b is not None:
            yield Change("+", path + ("/" if b.type == DIR else "")), (None, b.subtree, path) if b.type == DIR else None
        elif b is None and a is not None:
            yield Change("-", path + ("/" if a.type == DIR else "")), (a.subtree, None, path) if a.type == DIR else None
        elif a is not None and b is not None:
            if a.type != b.type:
                yield Change("T", path), None
            elif a.type == DIR:
                yield Change("U", path + "/") if _meta(a) != _meta(b) else None, (a.subtree, b.subtree, path)
            elif a.content != b.content or a.target != b.target or a.size != b.size:
                yield Change("M", path), None
            elif _meta(a) != _meta(b):
                yield Change("U", path), None


def _meta(n: Node) -> tuple[object, ...]:
    return (n.mode, n.uid, n.gid, n.mtime_ns, n.xattrs)
