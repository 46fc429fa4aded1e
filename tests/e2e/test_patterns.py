"""Backup excludes and restore includes/excludes: one matcher, restic's rules (docs/patterns.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon, Run

FILES = ("etc/ssh/ssh_config", "etc/ssh/sshd_config", "etc/ssh/moduli", "etc/a.conf", "etc/deep/er/b.conf",
         "x/d1/sub/a.tmp", "x/d1/sub/keep.txt", "x/d1/a.tmp", "dir/sub/f", "dir/other", "top.txt")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    return root


@pytest.fixture
def snapshot(hozon: Hozon, src: Path) -> Hozon:
    hozon("backup", str(src))
    return hozon


def restored(target: Path, src: Path) -> set[str]:
    """Files and directories restored below ``target`` for the source ``src`` (dirs end with '/')."""
    out: set[str] = set()
    base = target / src.relative_to("/")
    for dirpath, dirs, files in os.walk(target):
        for name in dirs + files:
            p = Path(dirpath) / name
            if base in p.parents:
                rel = str(p.relative_to(base))
                out.add(rel + "/" if p.is_dir() else rel)
            elif p != base and p not in base.parents:
                out.add(f"OUTSIDE THE SOURCE: {p}")
    return out


def restore(hozon: Hozon, target: Path, *args: str) -> Run:
    run = hozon("restore", "latest", "--target", str(target), *args, check=False)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def with_dirs(*files: str) -> set[str]:
    """The files and every directory above them, as ``restored`` lists them."""
    out = set(files)
    for f in files:
        parts = f.split("/")
        out |= {"/".join(parts[:i]) + "/" for i in range(1, len(parts))}
    return out


def test_include_of_a_glob_matches_at_any_depth_and_makes_only_the_directories_above(
        snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--include", "*.conf")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r", src) == with_dirs("etc/a.conf", "etc/deep/er/b.conf")
    assert (tmp_path / "r" / src.relative_to("/") / "etc/deep/er/b.conf").read_bytes() == \
        (src / "etc/deep/er/b.conf").read_bytes()


def test_include_without_a_leading_slash_matches_below_the_root(snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--include", "etc/ssh")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r", src) == with_dirs("etc/ssh/ssh_config", "etc/ssh/sshd_config", "etc/ssh/moduli")


def test_anchored_include_with_globstar(snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--include", f"{src}/etc/**/*.conf")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r", src) == with_dirs("etc/a.conf", "etc/deep/er/b.conf")
    run = restore(snapshot, tmp_path / "r2", "--include", f"{src}/x/d1/sub")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r2", src) == with_dirs("x/d1/sub/a.tmp", "x/d1/sub/keep.txt")


def test_exclude_of_a_name_excludes_it_everywhere(snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--exclude", "ssh_config")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r", src) == with_dirs(*(f for f in FILES if f != "etc/ssh/ssh_config"))


def test_negated_exclude_keeps_one_entry(snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--exclude", f"{src}/etc/ssh/*", "--exclude", f"!{src}/etc/ssh/moduli")
    assert run.returncode == 0, run.stderr
    assert restored(tmp_path / "r", src) == with_dirs(*(f for f in FILES if not f.endswith("_config")))


@pytest.mark.parametrize("option", ["--include", "--exclude"])
@pytest.mark.parametrize("pattern", ["", "!"])
def test_an_empty_pattern_is_a_usage_error(snapshot: Hozon, tmp_path: Path, option: str, pattern: str) -> None:
    run = restore(snapshot, tmp_path / "r", option, pattern)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("hozon: error: ") and "empty" in run.stderr
    assert not (tmp_path / "r").exists()


def test_an_include_that_matches_nothing_is_a_warning(snapshot: Hozon, src: Path, tmp_path: Path) -> None:
    run = restore(snapshot, tmp_path / "r", "--include", "*.nothing", "--include", "etc/a.conf")
    assert run.returncode == 3, run.stderr
    assert "'*.nothing' matched nothing" in run.stderr
    assert "a.conf" not in run.stderr
    assert restored(tmp_path / "r", src) == with_dirs("etc/a.conf")


def listed(hozon: Hozon, src: Path) -> set[str]:
    run = hozon("ls", "latest", str(src), "--json")
    out = set()
    for entry in json.loads(run.stdout):
        rel = os.path.relpath(entry["path"], src)
        if rel != ".":
            out.add(rel + "/" if entry["type"] == "dir" else rel)
    return out


def test_backup_excludes_use_the_same_rules(hozon: Hozon, src: Path) -> None:
    hozon("backup", str(src), "--exclude", "sub/*.tmp", "--exclude", f"{src}/dir/sub/")
    assert listed(hozon, src) == with_dirs(*(f for f in FILES if f not in ("x/d1/sub/a.tmp", "dir/sub/f"))) - {
        "dir/sub/"} | {"x/d1/sub/"}

    hozon("backup", str(src), "--exclude", "*.conf", "--exclude", "etc/ssh", "--exclude", "!etc/ssh")
    kept = with_dirs(*(f for f in FILES if not f.endswith(".conf")))
    assert listed(hozon, src) == kept | {"etc/deep/", "etc/deep/er/"}

    run = hozon("backup", str(src), "--exclude", "", check=False)
    assert run.returncode == 2 and "empty" in run.stderr and "Traceback" not in run.stderr
