"""Retention policies: which snapshots ``hozon forget`` keeps, decided from snapshot times alone.

Snapshots are first split into groups (by default one per host and set of paths); a policy applies
to each group on its own. Within a group, snapshots are taken newest first, and one is kept when

- it is among the ``last`` N newest;
- it is the newest snapshot of its hour, day, ISO week, month or year, and that bucket is among the
  first N such buckets (counting only buckets that hold a snapshot), for ``hourly`` … ``yearly``;
- it carries one of the ``tags`` to keep;
- it is no older than ``within`` before the group's newest snapshot (not before now: a host that
  stopped backing up keeps its last snapshots however long it stays silent).

Buckets are hours, days, weeks … of the viewer's local time zone (as restic does): snapshots are
stored in UTC, and "one a day" means the days of whoever runs forget, wherever the backups ran.
Everything else is removed. The code here is pure: no repository, no I/O.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hozon.errors import UsageError
from hozon.repo.snapshots import Snapshot

GROUP_FIELDS = ("host", "paths", "tags")


@dataclass(frozen=True)
class Duration:
    """A calendar span as restic writes it: ``1y6m``, ``14d``, ``2d12h`` (years, months, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        parts = re.findall(r"(\d+)([ymdh])", text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise UsageError(f"{text!r} is not a duration",
                             hint="write it as years, months, days, hours: 1y6m, 14d, 2d12h")
        amounts = {unit: 0 for unit in "ymdh"}
        for number, unit in parts:
            amounts[unit] += int(number)
        return cls(amounts["y"], amounts["m"], amounts["d"], amounts["h"])

    def before(self, when: datetime) -> datetime:
        """``when`` moved back by this span; a day past the end of the month becomes its last day."""
        month = when.year * 12 + when.month - 1 - self.years * 12 - self.months
        year, month = divmod(month, 12)
        day = min(when.day, calendar.monthrange(year, month + 1)[1])
        return when.replace(year=year, month=month + 1, day=day) - timedelta(days=self.days, hours=self.hours)

    def __str__(self) -> str:
        text = "".join(f"{n}{u}" for n, u in zip((self.years, self.months, self.days, self.hours), "ymdh",
                                                 strict=True) if n)
        return text or "0h"

    def __bool__(self) -> bool:
        return bool(self.years or self.months or self.days or self.hours)


@dataclass(frozen=True)
class Retention:
    """How many snapshots to keep, per kind of bucket; 0 means "this rule keeps nothing"."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    tags: tuple[str, ...] = ()
    within: Duration = Duration()

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must be 0 or more, not {getattr(self, name)}")

    @property
    def empty(self) -> bool:
        """A policy that keeps nothing (it would remove every snapshot)."""
        counts = (self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly)
        return not any(counts) and not self.tags and not self.within


@dataclass(frozen=True)
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: tuple[str, ...]  # why it is kept ("last snapshot", "daily snapshot", "tag 'x'"); empty if removed


_Bucket = tuple[int, ...]

_BUCKETS: tuple[tuple[str, Callable[[datetime], _Bucket]], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar())[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
)


def newest_first(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """Newest first; equal times are ordered by id so the result never depends on listing order."""
    return sorted(snapshots, key=lambda s: (s.datetime.timestamp(), s.id), reverse=True)


def apply_retention(snapshots: Iterable[Snapshot], policy: Retention) -> list[Decision]:
    """Decide every snapshot of one group; the result is newest first."""
    remaining = {"last": policy.last, **{name: getattr(policy, name) for name, _ in _BUCKETS}}
    seen: dict[str, set[_Bucket]] = {name: set() for name, _ in _BUCKETS}
    keep_tags = set(policy.tags)
    decisions: list[Decision] = []
    ordered = newest_first(snapshots)
    since = policy.within.before(ordered[0].datetime) if policy.within and ordered else None
    for snap in ordered:
        reasons = [f"tag '{t}'" for t in sorted(keep_tags & set(snap.tags))]
        if since is not None and snap.datetime >= since:
            reasons.append(f"within {policy.within}")
        if remaining["last"] > 0:
            remaining["last"] -= 1
            reasons.append("last snapshot")
        when = snap.datetime.astimezone()  # the viewer's zone (see the module docstring)
        for name, bucket_of in _BUCKETS:
            bucket = bucket_of(when)
            if remaining[name] > 0 and bucket not in seen[name]:
                seen[name].add(bucket)  # the first one met is the newest of its bucket
                remaining[name] -= 1
                reasons.append(f"{name} snapshot")
        decisions.append(Decision(snap, bool(reasons), tuple(reasons)))
    return decisions


# -- groups ---------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class GroupKey:
    """What the snapshots of one group share; a field not grouped by is None."""

    host: str | None = None
    paths: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None

    def describe(self) -> str:
        parts = []
        if self.host is not None:
            parts.append(f"host {self.host}")
        if self.paths is not None:
            parts.append(f"paths {', '.join(self.paths) or '(none)'}")
        if self.tags is not None:
            parts.append(f"tags {', '.join(self.tags) or '(none)'}")
        return "; ".join(parts) or "all snapshots"

    def as_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {"host": self.host, "paths": self.paths, "tags": self.tags}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items() if v is not None}


@dataclass
class Group:
    key: GroupKey
    decisions: list[Decision] = field(default_factory=list)

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]


def parse_group_by(text: str) -> tuple[str, ...]:
    """``host,paths`` → ("host", "paths"); an empty string means one group for everything."""
    fields = [f.strip() for f in text.split(",") if f.strip()]
    for f in fields:
        if f not in GROUP_FIELDS:
            raise UsageError(f"cannot group by {f!r}", hint="--group-by takes host, paths, tags, or a comma list")
    return tuple(f for f in GROUP_FIELDS if f in fields)


def group_key(snapshot: Snapshot, fields: Sequence[str]) -> GroupKey:
    return GroupKey(
        host=snapshot.hostname if "host" in fields else None,
        paths=tuple(sorted(snapshot.paths)) if "paths" in fields else None,
        tags=tuple(sorted(snapshot.tags)) if "tags" in fields else None,
    )


def plan_forget(snapshots: Iterable[Snapshot], policy: Retention, fields: Sequence[str]) -> list[Group]:
    """Group the snapshots and decide each group; groups come in a stable (sorted) order."""
    members: dict[GroupKey, list[Snapshot]] = {}
    for snap in snapshots:
        members.setdefault(group_key(snap, fields), []).append(snap)
    return [Group(key, apply_retention(snaps, policy)) for key, snaps in sorted(members.items())]
