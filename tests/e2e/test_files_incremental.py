"""Incremental file backups: unchanged files are not read again, yet every snapshot restores on its own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Hozon


def contents(root: Path) -> dict[str, bytes | None]:
    """Path below ``root`` → file bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[str((Path(dirpath) / name).relative_to(root))] = None
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def backup(hozon: Hozon, *args: str) -> dict[str, Any]:
    """Run a backup and return the new snapshot as ``hozon backup --json`` prints it."""
    run = hozon("backup", "--json", *args)
    assert "Traceback" not in run.stderr
    snapshot: dict[str, Any] = json.loads(run.stdout)["snapshot"]
    return snapshot


def restore(hozon: Hozon, snapshot_id: str, target: Path, source: Path) -> Path:
    run = hozon("restore", snapshot_id, "--target", str(target))
    assert "Traceback" not in run.stderr
    return target / source.relative_to("/")


def test_unchanged_files_are_not_read_and_each_snapshot_is_full(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in range(3):
        (src / f"dir{d}").mkdir(parents=True)
        for f in range(5):
            (src / f"dir{d}" / f"file{f}").write_bytes(os.urandom(1000 + 4000 * f))
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    n_files = 16
    state1 = contents(src)

    first = backup(hozon, str(src))
    assert first["summary"]["files_new"] == n_files

    second = backup(hozon, str(src))
    s = second["summary"]
    assert s["bytes_read"] == 0
    assert s["files_unmodified"] == n_files
    assert s["files_new"] == s["files_changed"] == 0
    assert s["total_files"] == n_files
    assert second["parent"] == first["id"]

    (src / "dir1" / "file2").write_bytes(b"changed content")
    (src / "dir2" / "added.txt").write_bytes(b"a new file")
    (src / "dir0" / "file4").unlink()
    state3 = contents(src)

    third = backup(hozon, str(src))
    s = third["summary"]
    assert third["parent"] == second["id"]
    assert (s["files_new"], s["files_changed"], s["files_unmodified"]) == (1, 1, n_files - 2)
    assert s["bytes_read"] == len(b"changed content") + len(b"a new file")

    run = hozon("diff", second["id"], third["id"])
    assert "Traceback" not in run.stderr
    changes = sorted(line for line in run.stdout.splitlines() if line[:2] in ("M ", "+ ", "- "))
    assert changes == sorted([
        f"M {src}/dir1/file2", f"+ {src}/dir2/added.txt", f"- {src}/dir0/file4",
    ]), run.stdout
    run = hozon("diff", first["id"], second["id"])
    assert not [line for line in run.stdout.splitlines() if line[:2] in ("M ", "+ ", "- ")], run.stdout

    # Each snapshot is complete on its own: restoring it gives the tree exactly as it was then.
    for snap, state in ((first, state1), (second, state1), (third, state3)):
        out = restore(hozon, snap["id"], tmp_path / f"restore-{snap['short_id']}", src)
        assert contents(out) == state, f"snapshot {snap['short_id']} does not restore its own state"


def test_many_small_files_second_backup_is_quick(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "many"
    n_dirs, per_dir = 100, 200
    for d in range(n_dirs):
        sub = src / f"d{d:03}"
        sub.mkdir(parents=True)
        for f in range(per_dir):
            (sub / f"f{f:03}").write_bytes(b"%d/%d " % (d, f) * (f % 7 + 1))
    n_files = n_dirs * per_dir

    started = time.monotonic()
    first = backup(hozon, str(src))
    first_s = time.monotonic() - started
    assert first["summary"]["files_new"] == n_files

    started = time.monotonic()
    second = backup(hozon, str(src))
    second_s = time.monotonic() - started
    print(f"\n{n_files} files: first backup {first_s:.1f} s, unchanged second backup {second_s:.1f} s")
    s = second["summary"]
    assert s["files_unmodified"] == n_files
    assert s["bytes_read"] == 0
    assert second["parent"] == first["id"]
