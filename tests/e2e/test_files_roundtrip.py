"""A file tree with every kind of entry and metadata Hozon promises to keep survives backup and restore.

Runs the real ``hozon`` command as root (as in CI): owners, device nodes and setuid bits need it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Hozon

MiB = 1024 * 1024
NON_UTF8 = os.fsdecode(b"caf\xe9")  # a name that is not valid UTF-8 (kept as a surrogate escape)
ODD_NAME = "with space and\nnewline"
SPARSE_SIZE = 64 * MiB
SPARSE_DATA = {0: b"head" * 1000, 10 * MiB + 3: os.urandom(200_000), 40 * MiB: b"x" * 5000}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners, device nodes, setuid bits")


def build_tree(root: Path) -> None:
    """Every kind of entry, with metadata worth checking; names are relative to ``root``."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello, hozon\n")
    (root / "random.bin").write_bytes(os.urandom(5 * MiB + 12345))
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep " * 1000)
    (root / "empty_dir").mkdir()
    (root / "a" / "empty_nested").mkdir()

    os.symlink("a/b/c/deep.txt", root / "rel_link")
    os.symlink("/etc/hostname", root / "abs_link")
    os.symlink("../does/not/exist", root / "a" / "dangling")

    (root / "links1").mkdir()
    (root / "links2").mkdir()
    (root / "links1" / "one").write_bytes(b"shared by two names " * 100)
    os.link(root / "links1" / "one", root / "links2" / "two")

    with open(root / "sparse.img", "wb") as f:
        for offset, data in SPARSE_DATA.items():
            f.seek(offset)
            f.write(data)
        f.truncate(SPARSE_SIZE)

    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "setgid").write_bytes(b"g")
    os.chmod(root / "setgid", 0o2750)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "private").write_bytes(b"secret")
    os.chmod(root / "private", 0o600)
    (root / "noperm").write_bytes(b"no permission bits at all")
    os.chmod(root / "noperm", 0o000)

    (root / "numeric_owner").write_bytes(b"owned by nobody we know")
    os.chown(root / "numeric_owner", 1234, 5678)
    (root / "named_owner").write_bytes(b"owned by daemon")
    os.chown(root / "named_owner", 1, 1)  # daemon:daemon on Debian
    (root / "owned_dir").mkdir()
    os.chown(root / "owned_dir", 1234, 5678)
    os.symlink("small.txt", root / "owned_link")
    os.chown(root / "owned_link", 1234, 5678, follow_symlinks=False)

    os.setxattr(root / "small.txt", "user.comment", b"a value")
    os.setxattr(root / "small.txt", "user.binary", bytes(range(256)))
    os.setxattr(root / "a", "user.on_a_dir", b"dir attr")

    os.mkfifo(root / "fifo")
    os.mknod(root / "null_dev", 0o640 | stat.S_IFCHR, os.makedev(1, 3))

    (root / NON_UTF8).write_bytes(b"latin-1 name")
    (root / ODD_NAME).write_bytes(b"odd name")

    # Times last: creating entries changes the mtime of their directory.
    stamps = {
        "small.txt": 1_600_000_000_123_456_789, "random.bin": 1_500_000_000_000_000_001,
        "a/b/c/deep.txt": 1_234_567_890_987_654_321, "rel_link": 1_400_000_000_000_000_007,
        "fifo": 1_300_000_000_000_000_003, "sticky": 1_650_000_000_111_111_111,
        "a/b": 1_620_000_000_222_222_222, NON_UTF8: 1_610_000_000_333_333_333,
    }
    for rel, ns in stamps.items():
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(1_111_111_111_000_000_999, 1_111_111_111_000_000_999))


def describe(root: Path) -> dict[str, dict[str, object]]:
    """Everything a user would compare between an original tree and its restore, keyed by path."""
    entries: dict[str, dict[str, object]] = {}
    inode_names: dict[int, list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files) + ([""] if Path(dirpath) == root else []):
            path = Path(dirpath) / name if name else root
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            info: dict[str, object] = {
                "type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            else:
                info["xattrs"] = {a: os.getxattr(path, a) for a in sorted(os.listxattr(path))}
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                info["content"] = path.read_bytes()
                if st.st_nlink > 1:
                    inode_names.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
            entries[rel] = info
    for names in inode_names.values():
        for rel in names:
            entries[rel]["hardlinked_with"] = sorted(names)
    return entries


def restored_root(target: Path, source: Path) -> Path:
    """Where a restore of ``source`` lands below ``target`` (snapshots keep absolute paths)."""
    return target / source.relative_to("/")


def snapshots(hozon: Hozon) -> list[dict[str, object]]:
    run = hozon("snapshots", "--json")
    assert "Traceback" not in run.stderr
    result: list[dict[str, object]] = json.loads(run.stdout)
    return result


def test_everything_survives_backup_and_restore(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    before = describe(src)

    run = hozon("backup", str(src), "--tag", "roundtrip")
    assert "Traceback" not in run.stderr
    assert "snapshot" in run.stdout

    target = tmp_path / "restore"
    run = hozon("restore", "latest", "--target", str(target))
    assert "Traceback" not in run.stderr
    assert run.stderr.strip() == ""  # no warnings
    out = restored_root(target, src)
    after = describe(out)

    assert sorted(after) == sorted(before)
    for rel, info in before.items():
        assert after[rel] == info, f"{rel!r} differs after restore"

    # Hard links: the two names share one inode again.
    assert os.stat(out / "links1" / "one").st_ino == os.stat(out / "links2" / "two").st_ino
    assert os.stat(out / "links1" / "one").st_nlink == 2
    # Sparse file: same bytes, holes restored as holes.
    with open(out / "sparse.img", "rb") as f:
        for offset, data in SPARSE_DATA.items():
            f.seek(offset)
            assert f.read(len(data)) == data
    restored_blocks = os.stat(out / "sparse.img").st_blocks * 512
    assert restored_blocks < 2 * MiB, f"sparse file takes {restored_blocks} bytes on disk after restore"
    # The named owner came back by name, the numeric one by number.
    assert os.stat(out / "named_owner").st_uid == 1
    assert os.lstat(out / "owned_link").st_uid == 1234


def test_listing_and_snapshot_json(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    run = hozon("backup", str(src), "--tag", "t1", "--tag", "t2")
    assert "Traceback" not in run.stderr

    run = hozon("ls", "latest", "--json")
    assert "Traceback" not in run.stderr
    listed = {entry["path"]: entry for entry in json.loads(run.stdout)}
    for rel in describe(src):
        path = str(src / rel) if rel != "." else str(src)
        assert path in listed, f"{path!r} missing from hozon ls"
    assert listed[str(src / "rel_link")]["type"] == "symlink"
    assert listed[str(src / "rel_link")]["target"] == "a/b/c/deep.txt"
    assert listed[str(src / "null_dev")]["type"] == "chardev"
    assert listed[str(src / "fifo")]["type"] == "fifo"
    assert listed[str(src / "random.bin")]["size"] == 5 * MiB + 12345
    assert listed[str(src / "numeric_owner")]["uid"] == 1234
    assert listed[str(src / "named_owner")]["user"] == "daemon"

    # The human listing prints names as the file system has them (bytes, not UTF-8).
    raw = subprocess.run([sys.executable, "-m", "hozon", "ls", "latest", "--long"], env=hozon.env,
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert raw.returncode == 0
    assert b"Traceback" not in raw.stderr
    assert os.fsencode(str(src / NON_UTF8)) in raw.stdout
    assert b"random.bin" in raw.stdout

    [snap] = snapshots(hozon)
    for key in ("id", "short_id", "time", "hostname", "paths", "tags", "kind", "parent", "summary"):
        assert key in snap, key
    assert snap["paths"] == [str(src)]
    assert snap["tags"] == ["t1", "t2"]
    assert snap["kind"] == "files"
    assert snap["parent"] is None
    assert str(snap["id"]).startswith(str(snap["short_id"]))
    summary = snap["summary"]
    assert isinstance(summary, dict)
    regular = sum(1 for info in describe(src).values() if info["type"] == stat.S_IFREG)
    assert summary["total_files"] == regular
    assert summary["files_new"] == regular
    assert summary["total_bytes"] >= 5 * MiB + SPARSE_SIZE
    assert 5 * MiB < summary["data_added"] < 10 * MiB  # the sparse file's holes are not stored
