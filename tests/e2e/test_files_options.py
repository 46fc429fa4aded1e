"""Backup and restore options: --tag, --exclude, --exclude-file, --one-file-system, restore --include/--exclude."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Hozon


def files_below(root: Path) -> set[str]:
    """Relative paths of everything below ``root`` (directories end with '/')."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out |= {f"{rel / d}/" for d in dirs} | {str(rel / f) for f in files}
    return {p.removeprefix("./") for p in out}


def listed(hozon: Hozon, snapshot: str, root: Path) -> set[str]:
    """Paths below ``root`` that ``hozon ls`` shows for a snapshot (directories end with '/')."""
    run = hozon("ls", snapshot, str(root), "--json")
    assert "Traceback" not in run.stderr
    out = set()
    for entry in json.loads(run.stdout):
        rel = os.path.relpath(entry["path"], root)
        if rel != ".":
            out.add(rel + "/" if entry["type"] == "dir" else rel)
    return out


def backup(hozon: Hozon, *args: str) -> dict[str, Any]:
    run = hozon("backup", "--json", *args)
    assert "Traceback" not in run.stderr
    snapshot: dict[str, Any] = json.loads(run.stdout)["snapshot"]
    return snapshot


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for rel in ("keep/a.txt", "keep/b.tmp", "keep/sub/c.log", "cache/big.bin", "logs/x.log", "top.txt", "top.tmp"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode() * 10)
    return src


def test_tags_and_tag_filter(hozon: Hozon, tree: Path) -> None:
    first = backup(hozon, str(tree), "--tag", "daily", "--tag", "db")
    second = backup(hozon, str(tree), "--tag", "weekly")
    assert first["tags"] == ["daily", "db"]
    assert second["tags"] == ["weekly"]
    run = hozon("snapshots", "--json", "--tag", "db")
    assert "Traceback" not in run.stderr
    assert [s["id"] for s in json.loads(run.stdout)] == [first["id"]]
    run = hozon("snapshots", "--tag", "weekly")
    assert second["short_id"] in run.stdout and first["short_id"] not in run.stdout


def test_exclude_globs_and_exclude_file(hozon: Hozon, tree: Path, tmp_path: Path) -> None:
    backup(hozon, str(tree), "--exclude", "*.tmp", "--exclude", str(tree / "cache"))
    assert listed(hozon, "latest", tree) == {
        "keep/", "keep/a.txt", "keep/sub/", "keep/sub/c.log", "logs/", "logs/x.log", "top.txt",
    }

    exclude_file = tmp_path / "excludes"
    exclude_file.write_text("# comments and blank lines are ignored\n\n*.log\n  logs  \n")
    backup(hozon, str(tree), "--exclude-file", str(exclude_file), "--exclude", "b.tmp")
    assert listed(hozon, "latest", tree) == {
        "keep/", "keep/a.txt", "keep/sub/", "cache/", "cache/big.bin", "top.txt", "top.tmp",
    }

    run = hozon("backup", str(tree), "--exclude-file", str(tmp_path / "missing"), check=False)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "missing" in run.stderr


def test_one_file_system_keeps_the_mount_point_but_not_its_content(hozon: Hozon, tree: Path) -> None:
    mnt = tree / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        (mnt / "on_tmpfs.txt").write_bytes(b"other file system")
        (mnt / "dir").mkdir()
        backup(hozon, str(tree), "--one-file-system")
        names = listed(hozon, "latest", tree)
        assert "mnt/" in names
        assert not [n for n in names if n.startswith("mnt/") and n != "mnt/"]
        assert "keep/sub/c.log" in names

        backup(hozon, str(tree))
        names = listed(hozon, "latest", tree)
        assert {"mnt/on_tmpfs.txt", "mnt/dir/"} <= names
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_restore_include_and_exclude(hozon: Hozon, tree: Path, tmp_path: Path) -> None:
    backup(hozon, str(tree))

    target = tmp_path / "r1"
    run = hozon("restore", "latest", "--target", str(target), "--include", str(tree / "keep"))
    assert "Traceback" not in run.stderr
    out = target / tree.relative_to("/")
    assert files_below(out) == {"keep/", "keep/a.txt", "keep/b.tmp", "keep/sub/", "keep/sub/c.log"}
    assert (out / "keep" / "a.txt").read_bytes() == (tree / "keep" / "a.txt").read_bytes()

    target = tmp_path / "r2"
    run = hozon("restore", "latest", "--target", str(target), "--exclude", "*.log", "--exclude", str(tree / "cache"))
    assert "Traceback" not in run.stderr
    out = target / tree.relative_to("/")
    assert files_below(out) == {"keep/", "keep/a.txt", "keep/b.tmp", "keep/sub/", "logs/", "top.txt", "top.tmp"}

    target = tmp_path / "r3"
    run = hozon("restore", "latest", "--target", str(target), "--include", str(tree / "keep"),
                "--exclude", "*.tmp")
    assert "Traceback" not in run.stderr
    out = target / tree.relative_to("/")
    assert files_below(out) == {"keep/", "keep/a.txt", "keep/sub/", "keep/sub/c.log"}


def test_backing_up_the_root_directory(hozon: Hozon, tree: Path, tmp_path: Path) -> None:
    """``hozon backup /`` keeps / itself (here everything but one small tree is excluded)."""
    excludes = []
    keep = tree
    while keep != keep.parent:
        excludes += [glob.escape(str(sibling)) for sibling in keep.parent.iterdir() if sibling != keep]
        keep = keep.parent
    exclude_file = tmp_path / "everything-else"
    exclude_file.write_text("\n".join(excludes) + "\n")

    # Everything else is excluded anyway; --one-file-system only where the tree is on /'s file system
    # (pytest's /tmp is a tmpfs on many machines).
    same_fs = os.stat("/").st_dev == os.stat(tree).st_dev
    run = hozon("backup", "/", *(["--one-file-system"] if same_fs else []), "--exclude-file", str(exclude_file),
                "--json", check=False)
    assert "Traceback" not in run.stderr
    # Entries may appear in /tmp meanwhile (other programs): they are backed up or, if they vanish, warned about.
    assert run.returncode in (0, 3), run.stderr
    result = json.loads(run.stdout)
    assert not [w for w in result["warnings"] if str(tree) in w]
    assert result["snapshot"]["paths"] == ["/"]
    assert listed(hozon, "latest", tree) == files_below(tree)

    target = tmp_path / "restore"
    run = hozon("restore", "latest", "--target", str(target), "--include", str(tree))
    assert "Traceback" not in run.stderr
    out = target / tree.relative_to("/")
    assert files_below(out) == files_below(tree)
    assert (out / "keep" / "sub" / "c.log").read_bytes() == (tree / "keep" / "sub" / "c.log").read_bytes()


def test_brackets_in_names_tags_and_messages_are_shown_as_they_are(hozon: Hozon, tmp_path: Path) -> None:
    """Rich markup must never apply to user data: '[/]' in a name once ended in a MarkupError."""
    src = tmp_path / "odd[" / "][/]"
    src.mkdir(parents=True)
    (src / "[bold]file[x]").write_bytes(b"brackets\n")
    backup(hozon, str(src), "--tag", "[/]")

    run = hozon("snapshots")
    assert "Traceback" not in run.stderr
    assert "[/]" in run.stdout and str(src) in run.stdout
    run = hozon("ls", "latest", str(src))
    assert str(src / "[bold]file[x]") in run.stdout.splitlines()
    run = hozon("ls", "latest", str(src / "missing[/]"), check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert str(src / "missing[/]") in run.stderr
    target = tmp_path / "restore[/]"
    run = hozon("restore", "latest", "--target", str(target))
    assert "Traceback" not in run.stderr and str(target) in run.stdout
    assert (target / src.relative_to("/") / "[bold]file[x]").read_bytes() == b"brackets\n"
