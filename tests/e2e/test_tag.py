"""hozon tag: tags change by writing a new snapshot file; everything else about the snapshot stays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Hozon


def snapshots(hozon: Hozon) -> list[dict[str, object]]:
    return list(json.loads(hozon("snapshots", "--json").stdout))


def test_add_remove_and_set_tags(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("content")
    hozon("backup", str(src), "--tag", "nightly")
    (before,) = snapshots(hozon)

    changed = json.loads(hozon("tag", "--add", "keep", "--add", "audit", "--remove", "nightly", "latest",
                               "--json").stdout)
    assert changed[0]["changed"] and changed[0]["tags"] == ["audit", "keep"]
    (after,) = snapshots(hozon)  # one snapshot still: the old file was replaced
    assert after["id"] == changed[0]["new"] != before["id"]
    assert after["tags"] == ["audit", "keep"]
    for field in ("time", "hostname", "paths", "tree", "summary"):
        assert after[field] == before[field]
    assert not (hozon.repo / "snapshots" / str(before["id"])).exists()

    same = hozon("tag", "--add", "keep", str(after["id"])[:8])
    assert "unchanged" in same.stdout
    hozon("tag", "--set", "", "latest")
    assert snapshots(hozon)[0]["tags"] == []

    restore = tmp_path / "restore"
    hozon("restore", "latest", "--target", str(restore))
    assert (restore / str(src).lstrip("/") / "f").read_text() == "content"
    assert hozon("check").returncode == 0


def test_tag_refuses_what_cannot_work(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    hozon("backup", str(src))
    for args in (["tag", "latest"], ["tag", "--set", "a", "--add", "b", "latest"]):
        run = hozon(*args, check=False)
        assert run.returncode == 2 and "Traceback" not in run.stderr
    missing = hozon("tag", "--add", "x", "deadbeef", check=False)
    assert missing.returncode == 1 and "no snapshot matches" in missing.stderr
