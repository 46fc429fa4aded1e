"""Path patterns, one rule set for backup excludes and restore includes and excludes (restic's rules).

    /etc/ssh        anchored at the root: /etc/ssh, and everything below it when it is a directory
    ssh_config      any other pattern matches at any depth: every entry named ssh_config
    sub/*.tmp       …a .tmp entry directly inside any directory named sub
    /var/**/*.log   ``**`` (a whole component) stands for any number of directories, none too
    !/etc/ssh/keep  negation: takes back what the patterns before it matched

A pattern is matched one path component at a time (``*``, ``?`` and ``[…]`` never cross a ``/``;
a leading dot is matched like any character; ``\\`` escapes); wcmatch does the globbing of one
component. Matching is incremental: a restore carries each directory's state to its children, so
it knows at once whether anything below a directory can still match (an anchored pattern only
along its own prefix; a pattern that matches at any depth always) without trying each path again.
docs/patterns.md is the user's description.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from wcmatch import fnmatch

from hozon.errors import UsageError

_FLAGS = fnmatch.CASE | fnmatch.DOTMATCH
_GLOBSTAR = "**"
MATCHED = None  # a pattern's state once it matched an ancestor or the entry itself: all below match too

PatternState = frozenset[int] | None  # positions of the pattern still to match, or MATCHED
State = tuple[PatternState, ...]  # one per pattern, in order
Positions = tuple[frozenset[int], ...]  # the same without MATCHED, for naming entries (find)


class _Part:
    """One component of a pattern: a literal name, a glob, or ``**``."""

    def __init__(self, text: str) -> None:
        self.globstar = text == _GLOBSTAR
        self.literal = None if fnmatch.is_magic(text, flags=_FLAGS) else text
        self._glob = None if self.globstar or self.literal is not None else fnmatch.compile([text], _FLAGS)

    def matches(self, name: str) -> bool:
        if self._glob is not None:
            return bool(self._glob.match(name))
        return self.globstar or name == self.literal


@dataclass(frozen=True)
class Pattern:
    text: str
    negated: bool
    anchored: bool
    parts: tuple[_Part, ...]

    def closure(self, positions: Iterable[int]) -> frozenset[int]:
        """``positions`` plus those reached by letting each ``**`` stand for no directory."""
        out = set(positions)
        for i in sorted(out):
            while i < len(self.parts) and self.parts[i].globstar:
                i += 1
                out.add(i)
        return frozenset(out)

    def advance(self, positions: frozenset[int], name: str) -> frozenset[int]:
        """The positions after entry ``name``; ``len(parts)`` among them: the pattern ends at this entry."""
        end = len(self.parts)
        after = [i if part.globstar else i + 1 for i in positions if i < end and (part := self.parts[i]).matches(name)]
        if not self.anchored:
            after.append(0)  # it may start at any depth
        return self.closure(after)

    def step(self, state: PatternState, name: str) -> PatternState:
        if state is MATCHED or len(self.parts) in state:
            return MATCHED
        reached = self.advance(state, name)
        return MATCHED if len(self.parts) in reached else reached


def parse_pattern(text: str) -> Pattern:
    """One pattern, checked: an empty one (or one naming no path) is a usage error."""
    body = text[1:] if text.startswith("!") else text
    if not body:
        raise UsageError(f"the pattern {text!r} is empty; it would match nothing",
                         hint="see docs/patterns.md for the pattern syntax")
    parts = [p for p in body.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"the pattern {text!r} has a '..' component; patterns match stored paths, which have none")
    anchored = body.startswith("/")
    if not parts and not anchored:
        raise UsageError(f"the pattern {text!r} names no path", hint="to match everything below the root, use: /")
    return Pattern(text, text.startswith("!"), anchored, tuple(_Part(p) for p in parts))


class PatternList:
    """Ordered patterns; a path matches when the last pattern that decides it is not a negation."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = [parse_pattern(p) for p in patterns]
        self._negations = any(p.negated for p in self.patterns)
        self.used: set[int] = set()  # indexes of patterns that matched some path (for "matched nothing")

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def root(self) -> State:
        return tuple(p.closure([0]) for p in self.patterns)

    def child(self, state: State, name: str) -> State:
        """The state of entry ``name`` inside the directory whose state is ``state``."""
        after = tuple(p.step(s, name) for p, s in zip(self.patterns, state, strict=True))
        for i, (old, new) in enumerate(zip(state, after, strict=True)):
            if new is MATCHED and old is not MATCHED:
                self.used.add(i)
        return after

    def verdict(self, state: State) -> tuple[bool, bool]:
        """(the entry matches, something below it may match): restic's order of patterns."""
        matched = descend = False
        for pattern, s in zip(self.patterns, state, strict=True):
            hit = s is MATCHED
            if pattern.negated:
                matched = matched and not hit
                descend = descend and not hit
            else:
                matched = matched or hit
                descend = descend or hit or bool(s)
                if matched and not self._negations:
                    break
        return matched, descend

    def matches(self, path: str) -> bool:
        """Whether the absolute path ``path`` matches (it or a directory above it)."""
        state = self.root()
        for name in path.split("/"):
            if name:
                state = self.child(state, name)
        return self.verdict(state)[0]

    # -- naming entries (hozon find): a match does not take a directory's contents ---------------
    def entry_child(self, positions: Positions, name: str) -> Positions:
        """Like :meth:`child` from :meth:`root`, but a pattern that named a directory can name entries below it."""
        return tuple(p.advance(s, name) for p, s in zip(self.patterns, positions, strict=True))

    def entry_verdict(self, positions: Positions) -> tuple[bool, bool]:
        """(the patterns name this very entry, some entry below it may be named)."""
        named = descend = False
        for pattern, s in zip(self.patterns, positions, strict=True):
            ends = len(pattern.parts) in s
            if pattern.negated:
                named = named and not ends
            else:
                named = named or ends
                descend = descend or any(i < len(pattern.parts) for i in s)
        return named, descend

    def unused(self) -> list[str]:
        """The patterns (not negations) that matched no path."""
        return [p.text for i, p in enumerate(self.patterns) if not p.negated and i not in self.used]


@lru_cache(maxsize=8)
def compiled(patterns: tuple[str, ...]) -> PatternList:
    """A shared compiled list, for callers that test one whole path at a time (backup excludes)."""
    return PatternList(patterns)
