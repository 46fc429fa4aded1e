"""hozon find: which snapshots hold a path, named by the patterns of docs/patterns.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Hozon


def hits(hozon: Hozon, *args: str) -> dict[str, list[str]]:
    """snapshot short id → matching paths, below the test's source directory."""
    doc = json.loads(hozon("find", "--json", *args).stdout)
    return {f["snapshot"][:8]: [h["path"] for h in f["hits"]] for f in doc}


def test_find_names_entries_across_snapshots_with_size_and_time(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc" / "ssh").mkdir(parents=True)
    (src / "etc" / "ssh" / "ssh_config").write_text("Host *\n")
    (src / "etc" / "a.conf").write_text("a")
    (src / "x.conf").mkdir()
    (src / "x.conf" / "inner.conf").write_text("inner")
    (src / "x.conf" / "other.txt").write_text("not a conf")
    first = json.loads(hozon("backup", str(src), "--json").stdout)["snapshot"]["short_id"]
    (src / "etc" / "b.conf").write_text("b" * 5000)
    second = json.loads(hozon("backup", str(src), "--json").stdout)["snapshot"]["short_id"]

    s = str(src)
    assert hits(hozon, "*.conf") == {
        first: [f"{s}/etc/a.conf", f"{s}/x.conf", f"{s}/x.conf/inner.conf"],
        second: [f"{s}/etc/a.conf", f"{s}/etc/b.conf", f"{s}/x.conf", f"{s}/x.conf/inner.conf"],
    }
    assert hits(hozon, "b.conf") == {second: [f"{s}/etc/b.conf"]}
    assert hits(hozon, f"{s}/etc/ssh", "--snapshot", first) == {first: [f"{s}/etc/ssh"]}
    assert hits(hozon, "etc/**/ssh_config") == {first: [f"{s}/etc/ssh/ssh_config"],
                                               second: [f"{s}/etc/ssh/ssh_config"]}
    assert hits(hozon, "*.conf", "!inner.conf", "--snapshot", first) == {first: [f"{s}/etc/a.conf", f"{s}/x.conf"]}

    text = hozon("find", "b.conf").stdout
    assert f"snapshot {second}" in text and "4.88 KiB" in text and f"{s}/etc/b.conf" in text

    none = hozon("find", "no-such-name")
    assert none.stdout == "" and "no snapshot holds a path matching no-such-name" in none.stderr
    bad = hozon("find", "", check=False)
    assert bad.returncode == 2 and "empty" in bad.stderr and "Traceback" not in bad.stderr
