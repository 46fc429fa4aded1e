"""Snapshot times: stored in UTC, shown in the viewer's zone with the zone named; older offsets still read."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from tests.conftest import PASSWORD, Hozon

from hozon.repo.backends.local import LocalBackend
from hozon.repo.repository import Repository

NEW_YORK = {"TZ": "America/New_York"}
UTC_ZONE = {"TZ": "UTC"}
SHOWN = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z]{3}")


def listed(hozon: Hozon, env: dict[str, str]) -> dict[str, str]:
    """Short id → the Time column of ``hozon snapshots``."""
    out = hozon("snapshots", env=env).stdout
    rows = {}
    for line in out.splitlines():
        found = SHOWN.search(line)
        if found:
            rows[line.split()[0]] = found.group(0)
    return rows


def test_times_are_stored_in_utc_and_shown_in_the_viewers_zone(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    src = make_tree({"a.txt": "a"})
    hozon("backup", str(src), env=NEW_YORK)  # a host in New York …
    (src / "b.txt").write_text("b")
    hozon("backup", str(src), env=UTC_ZONE)  # … and one in UTC, a moment later
    snaps = json.loads(hozon("snapshots", "--json").stdout)
    assert all(s["time"].endswith("+00:00") for s in snaps), [s["time"] for s in snaps]
    instants = [datetime.fromisoformat(s["time"]) for s in snaps]
    assert abs((instants[1] - instants[0]).total_seconds()) < 60

    in_new_york = listed(hozon, NEW_YORK)
    in_utc = listed(hozon, UTC_ZONE)
    assert set(in_new_york) == set(in_utc) == {s["short_id"] for s in snaps}
    for s, instant in zip(snaps, instants, strict=True):
        new_york = instant.astimezone(ZoneInfo("America/New_York"))
        assert in_new_york[s["short_id"]] == new_york.strftime("%Y-%m-%d %H:%M:%S %Z")  # EST or EDT
        assert in_utc[s["short_id"]] == instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_an_older_snapshot_with_its_writers_offset_reads_and_sorts_by_instant(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    hozon("backup", str(make_tree({"a.txt": "a"})))
    repo = Repository.open(LocalBackend(hozon.repo), PASSWORD)
    (snap,) = repo.list_snapshots()
    # As Hozon before UTC storage wrote it on a New York host: 12:00 local is 17:00 UTC …
    snap.time = "2026-12-07T12:00:00-05:00"
    older = repo.save_snapshot(snap)
    # … so it is older than one written at 17:30 UTC, though 12:00 < 17:30 as text.
    snap.time, snap.tags = "2026-12-07T17:30:00+00:00", ["utc"]
    newer = repo.save_snapshot(snap)

    snaps = json.loads(hozon("snapshots", "--json", "--tag", "utc", "--path", snap.paths[0]).stdout)
    assert [s["id"] for s in snaps] == [newer]
    everything = [s for s in json.loads(hozon("snapshots", "--json").stdout) if s["id"] in (older, newer)]
    assert [s["id"] for s in everything] == [older, newer]
    assert everything[0]["time"] == "2026-12-07T12:00:00-05:00"  # --json keeps the stored text
    in_utc = listed(hozon, UTC_ZONE)
    assert in_utc[older[:8]] == "2026-12-07 17:00:00 UTC"
    assert in_utc[newer[:8]] == "2026-12-07 17:30:00 UTC"
    assert listed(hozon, NEW_YORK)[older[:8]] == "2026-12-07 12:00:00 EST"
    assert listed(hozon, {"TZ": "Asia/Tokyo"})[older[:8]] == "2026-12-08 02:00:00 JST"


def test_forget_counts_days_in_the_viewers_zone(
    hozon: Hozon, make_tree: Callable[[dict[str, bytes | str]], Path]
) -> None:
    hozon("backup", str(make_tree({"a.txt": "a"})))
    repo = Repository.open(LocalBackend(hozon.repo), PASSWORD)
    (snap,) = repo.list_snapshots()
    ids = []
    for when in ("2026-01-01T14:30:00+00:00", "2026-01-01T15:30:00+00:00"):  # 23:30 and 00:30 in Tokyo
        snap.time = when
        ids.append(repo.save_snapshot(snap))

    def kept(env: dict[str, str]) -> set[str]:
        doc = json.loads(hozon("forget", "--keep-daily", "5", "--dry-run", "--json", env=env).stdout)
        return {s["id"] for group in doc["groups"] for s in group["keep"]}

    assert not set(ids) <= kept(UTC_ZONE)  # one UTC day: only the later one is its newest
    assert set(ids) <= kept({"TZ": "Asia/Tokyo"})  # two days in Tokyo
