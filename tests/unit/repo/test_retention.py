"""Retention policies on synthetic snapshot times, and prune's grace rule on a fake lock timeline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from hozon.errors import UsageError
from hozon.repo.locks import LockInfo
from hozon.repo.prune import grace_over
from hozon.repo.retention import Duration, GroupKey, Retention, apply_retention, parse_group_by, plan_forget
from hozon.repo.snapshots import Snapshot

START = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)  # a Friday


def snap(when: datetime, sid: str = "", host: str = "h", paths: tuple[str, ...] = ("/data",),
         tags: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(time=when.isoformat(), hostname=host, paths=list(paths), kind="files", tags=list(tags),
                    id=sid or f"{when.isoformat()}|{host}|{','.join(paths)}")


def kept(snaps: list[Snapshot], policy: Retention) -> list[str]:
    """The kept snapshots' times, newest first (as the policy decides them)."""
    return [d.snapshot.time for d in apply_retention(snaps, policy) if d.keep]


def series(count: int, step: timedelta, start: datetime = START) -> list[Snapshot]:
    return [snap(start + i * step) for i in range(count)]


# -- single rules ---------------------------------------------------------------------------------
def test_keep_last_keeps_the_n_newest_whatever_the_input_order() -> None:
    snaps = series(10, timedelta(hours=1))
    shuffled = snaps[:]
    random.Random(1).shuffle(shuffled)
    decisions = apply_retention(shuffled, Retention(last=3))
    assert [d.snapshot.time for d in decisions] == [s.time for s in reversed(snaps)]  # newest first
    assert [d.keep for d in decisions] == [True] * 3 + [False] * 7
    assert decisions[0].reasons == ("last snapshot",)
    assert decisions[5].reasons == ()


def test_keep_last_larger_than_the_group_keeps_everything() -> None:
    assert len(kept(series(4, timedelta(days=1)), Retention(last=10))) == 4


def test_keep_daily_keeps_the_newest_of_each_of_the_last_n_days_that_have_snapshots() -> None:
    # Four snapshots a day (00:00, 06:00, 12:00, 18:00) on Mar 15, 16, 17, then nothing until Mar 20.
    days = [START.replace(hour=0) + timedelta(days=d) for d in (0, 1, 2, 5)]
    snaps = [snap(day + timedelta(hours=h)) for day in days for h in (0, 6, 12, 18)]
    result = kept(snaps, Retention(daily=3))
    # Day buckets count only days that hold a snapshot: Mar 20, 17, 16 (the gap is skipped).
    assert result == [(days[i] + timedelta(hours=18)).isoformat() for i in (3, 2, 1)]


def test_keep_hourly() -> None:
    snaps = series(12, timedelta(minutes=20))  # 12:00 … 15:40, three per hour
    result = kept(snaps, Retention(hourly=2))
    assert result == [(START + timedelta(hours=3, minutes=40)).isoformat(),
                      (START + timedelta(hours=2, minutes=40)).isoformat()]


def test_keep_weekly_uses_iso_weeks_across_a_year_boundary() -> None:
    # Thu 2020-12-31 and Sun 2021-01-03 are both in ISO week 53 of 2020; Mon 2021-01-04 starts week 1.
    times = [datetime(2020, 12, 28, tzinfo=UTC), datetime(2020, 12, 31, tzinfo=UTC),
             datetime(2021, 1, 3, tzinfo=UTC), datetime(2021, 1, 4, tzinfo=UTC), datetime(2021, 1, 10, tzinfo=UTC)]
    result = kept([snap(t) for t in times], Retention(weekly=3))
    assert result == [times[4].isoformat(), times[2].isoformat()]  # only two ISO weeks hold snapshots


def test_keep_monthly_and_yearly() -> None:
    times = [datetime(y, m, d, tzinfo=UTC) for y, m, d in
             [(2022, 5, 1), (2022, 12, 30), (2023, 1, 2), (2023, 1, 30), (2023, 2, 1), (2024, 2, 10)]]
    snaps = [snap(t) for t in times]
    assert kept(snaps, Retention(monthly=3)) == [times[5].isoformat(), times[4].isoformat(), times[3].isoformat()]
    assert kept(snaps, Retention(yearly=10)) == [times[5].isoformat(), times[4].isoformat(), times[1].isoformat()]


@pytest.fixture(autouse=True)
def viewer_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Buckets follow the viewer's zone: UTC here unless a test says otherwise."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    set_zone("UTC")
    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_buckets_use_the_viewers_local_time(viewer_zone: Callable[[str], None]) -> None:
    late = snap(datetime(2024, 1, 1, 14, 30, tzinfo=UTC))  # 23:30 in Tokyo, on Jan 1 …
    early = snap(datetime(2024, 1, 2, 0, 30, tzinfo=timezone(timedelta(hours=9))))  # 00:30 on Jan 2 in Tokyo
    assert len(kept([late, early], Retention(daily=5))) == 1  # one UTC day
    viewer_zone("Asia/Tokyo")
    assert len(kept([late, early], Retention(daily=5))) == 2  # two Tokyo days


def test_keep_tag_keeps_tagged_snapshots_anywhere_in_the_history() -> None:
    snaps = series(6, timedelta(days=1))
    snaps[0].tags = ["release"]
    snaps[2].tags = ["other"]
    decisions = apply_retention(snaps, Retention(last=1, tags=("release",)))
    keep = {d.snapshot.time: d.reasons for d in decisions if d.keep}
    assert keep == {snaps[5].time: ("last snapshot",), snaps[0].time: ("tag 'release'",)}


def test_rules_combine_and_each_names_its_reason() -> None:
    snaps = series(48, timedelta(hours=1))  # two days, one per hour
    decisions = apply_retention(snaps, Retention(last=2, hourly=3, daily=2))
    keep = [(d.snapshot.time, d.reasons) for d in decisions if d.keep]
    newest = START + timedelta(hours=47)
    assert keep[0] == (newest.isoformat(), ("last snapshot", "hourly snapshot", "daily snapshot"))
    assert keep[1] == ((newest - timedelta(hours=1)).isoformat(), ("last snapshot", "hourly snapshot"))
    assert keep[2] == ((newest - timedelta(hours=2)).isoformat(), ("hourly snapshot",))
    # The newest of the previous day (Mar 16 23:00) is the second daily snapshot.
    assert keep[3] == (datetime(2024, 3, 16, 23, tzinfo=UTC).isoformat(), ("daily snapshot",))
    assert len(keep) == 4


def test_equal_times_are_decided_by_id_so_the_result_is_stable() -> None:
    a, b = snap(START, sid="aaaa"), snap(START, sid="bbbb")
    assert [d.snapshot.id for d in apply_retention([a, b], Retention(last=1)) if d.keep] == ["bbbb"]
    assert [d.snapshot.id for d in apply_retention([b, a], Retention(last=1)) if d.keep] == ["bbbb"]


def test_an_empty_policy_is_empty_and_negative_counts_are_refused() -> None:
    assert Retention().empty
    assert not Retention(tags=("x",)).empty
    assert not Retention(yearly=1).empty
    with pytest.raises(UsageError):
        Retention(daily=-1)


# -- groups ---------------------------------------------------------------------------------------
def test_group_by_parses_known_fields_in_a_fixed_order() -> None:
    assert parse_group_by("host,paths") == ("host", "paths")
    assert parse_group_by("paths, host") == ("host", "paths")
    assert parse_group_by("tags") == ("tags",)
    assert parse_group_by("") == ()
    with pytest.raises(UsageError):
        parse_group_by("host,colour")


def test_the_policy_applies_to_each_group_on_its_own() -> None:
    snaps = [snap(START + timedelta(hours=i), host=host, paths=paths)
             for i in range(3) for host in ("web", "db") for paths in (("/etc",), ("/srv", "/home"))]
    groups = plan_forget(snaps, Retention(last=1), ("host", "paths"))
    assert [g.key for g in groups] == [
        GroupKey("db", ("/etc",)), GroupKey("db", ("/home", "/srv")),
        GroupKey("web", ("/etc",)), GroupKey("web", ("/home", "/srv")),
    ]
    for g in groups:
        assert len(g.kept) == 1 and len(g.removed) == 2
        assert g.kept[0].snapshot.time == (START + timedelta(hours=2)).isoformat()
    assert groups[1].key.as_dict() == {"host": "db", "paths": ["/home", "/srv"]}
    assert groups[1].key.describe() == "host db; paths /home, /srv"

    by_host = plan_forget(snaps, Retention(last=1), ("host",))
    assert len(by_host) == 2 and all(len(g.kept) == 1 for g in by_host)
    everything = plan_forget(snaps, Retention(last=1), ())
    assert len(everything) == 1 and len(everything[0].kept) == 1
    assert everything[0].key.describe() == "all snapshots"


def test_paths_with_commas_do_not_merge_groups() -> None:
    a = snap(START, paths=("/a,b",))
    b = snap(START + timedelta(hours=1), paths=("/a", "b"))
    assert len(plan_forget([a, b], Retention(last=1), ("paths",))) == 2


# -- prune's grace rule ---------------------------------------------------------------------------
def lock(started: float, kind: str = "shared") -> LockInfo:
    return LockInfo(name=f"lock{started}", kind=kind, hostname="elsewhere", pid=1, command="backup",
                    started=started, refreshed=time.time())


def test_grace_rule_on_a_lock_timeline() -> None:
    condemned_at = 1_000
    assert grace_over(condemned_at, [])  # nobody else: the pack may go at once
    assert grace_over(condemned_at, [lock(1_001), lock(5_000)])  # all started after: they never saw it live
    assert not grace_over(condemned_at, [lock(999)])  # started before: may still reference its blobs
    assert not grace_over(condemned_at, [lock(1_000)])  # started at the same second: be safe
    assert not grace_over(condemned_at, [lock(2_000), lock(10)])  # one early backup is enough to wait


# -- keep-within ----------------------------------------------------------------------------------
def test_a_duration_is_read_as_restic_writes_it() -> None:
    assert Duration.parse("1y6m") == Duration(years=1, months=6)
    assert Duration.parse("2d12h") == Duration(days=2, hours=12)
    assert str(Duration.parse("14d")) == "14d"
    for bad in ("", "7", "d", "1w", "1d 2h", "-1d", "1.5d"):
        with pytest.raises(UsageError):
            Duration.parse(bad)


def test_a_duration_moves_back_by_calendar_months_and_clamps_the_day() -> None:
    march_31 = datetime(2024, 3, 31, 10, 0, tzinfo=UTC)
    assert Duration(months=1).before(march_31) == datetime(2024, 2, 29, 10, 0, tzinfo=UTC)  # a leap year
    assert Duration(years=1, months=3).before(march_31) == datetime(2022, 12, 31, 10, 0, tzinfo=UTC)
    assert Duration(days=1, hours=11).before(march_31) == datetime(2024, 3, 29, 23, 0, tzinfo=UTC)


def test_keep_within_counts_back_from_the_groups_newest_snapshot_not_from_now() -> None:
    snaps = series(10, timedelta(days=1))  # long ago: keep-within still keeps the newest days
    decisions = apply_retention(snaps, Retention(within=Duration(days=3)))
    assert [d.keep for d in decisions] == [True] * 4 + [False] * 6  # the newest and three days before it
    assert decisions[3].reasons == ("within 3d",)
    assert not Retention(within=Duration(days=3)).empty
