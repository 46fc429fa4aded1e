"""A source that fails while it is backed up: each failure costs the failing file alone, and is named.

The faults are real: the tree is a FUSE file system (``tests/faultfs.py``) that returns EIO for
chosen files, swaps a file for a FIFO between ``lstat`` and ``open``, changes a file while it is
read, or fails to list a directory. The user's checks: every healthy file is in the snapshot and
restores byte-exact, each file left out is named in a warning, the backup exits 3 and never hangs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.faultfs import Spec, content, mounted

if TYPE_CHECKING:
    from conftest import Hozon, Run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3 (Debian fuse3)"),
]

F_SETLEASE = 1024  # fcntl.h; Python's fcntl module names it from 3.12 on
BACKUP_TIMEOUT = 120  # a backup that waits on a FIFO or a stalled read would wait forever


def _backup(hozon: Hozon, path: Path) -> Run:
    run = hozon("backup", str(path), check=False, timeout=BACKUP_TIMEOUT)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def _warnings(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("warning: ")]


def _listed(hozon: Hozon, path: Path) -> dict[str, dict[str, object]]:
    return {e["path"]: e for e in json.loads(hozon("ls", "latest", str(path), "--json").stdout)}


def _assert_restored(hozon: Hozon, mnt: Path, files: dict[str, int]) -> Path:
    """Every one of ``files`` (path in the mount → size) comes back with exactly its bytes; where they are."""
    target = mnt.parent / "restored"
    run = hozon("restore", "latest", "--target", str(target), check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    restored = target / str(mnt).lstrip("/")
    for path, size in files.items():
        assert (restored / path.lstrip("/")).read_bytes() == content(path, size), path
    return restored


def test_unreadable_files_cost_only_themselves(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    spec: Spec = {f"/bad/f{i:02}": {"size": 1000 + i, "fault": "eio"} for i in range(25)}
    # Larger ones fail part way, after some of their chunks were stored.
    spec |= {f"/bad/large{i}": {"size": 600_000, "fault": "eio", "eio_at": 300_000} for i in range(5)}
    healthy = {f"/d{d:02}/f{f:02}": 200 + 37 * f + d for d in range(40) for f in range(40)}
    spec |= {p: {"size": size} for p, size in healthy.items()}
    with mounted(spec, mnt):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    warned = _warnings(run)
    for name in [p for p in spec if p.startswith("/bad/")]:
        assert any(w.startswith(f"warning: {mnt}{name}: ") for w in warned), (name, warned)
    assert len(warned) == 30, warned
    listed = _listed(hozon, mnt)
    missing = [p for p in healthy if f"{mnt}{p}" not in listed]
    assert not missing, f"{len(missing)} healthy files left out: {missing[:5]}"
    assert not [p for p in listed if p.startswith(f"{mnt}/bad/")], "an unreadable file is in the snapshot"
    _assert_restored(hozon, mnt, healthy)


def test_a_failed_hard_linked_file_is_left_out_under_every_name(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    spec: Spec = {
        "/a/broken": {"size": 3_000_000, "fault": "eio", "eio_at": 1_000_000},
        "/b/broken-too": {"size": 3_000_000, "link": "/a/broken"},
        "/c/broken-three": {"size": 3_000_000, "link": "/a/broken"},
        "/a/small-broken": {"size": 5000, "fault": "eio"},
        "/b/small-broken-too": {"size": 5000, "link": "/a/small-broken"},
        "/a/fine": {"size": 2_000_000},
        "/b/fine-too": {"size": 2_000_000, "link": "/a/fine"},
    }
    with mounted(spec, mnt):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    warned = _warnings(run)
    for name in ["/a/broken", "/b/broken-too", "/c/broken-three", "/a/small-broken", "/b/small-broken-too"]:
        assert any(w.startswith(f"warning: {mnt}{name}: ") for w in warned), (name, warned)
    listed = _listed(hozon, mnt)
    assert not [p for p in listed if "broken" in p], "a file with made-up bytes is in the snapshot"
    restored = _assert_restored(hozon, mnt, {"/a/fine": 2_000_000})
    assert (restored / "b" / "fine-too").read_bytes() == content("/a/fine", 2_000_000)
    assert os.path.samefile(restored / "a" / "fine", restored / "b" / "fine-too")


def test_a_reused_inode_number_is_not_taken_for_a_hard_link(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    # Two different files that stat shows with one inode number and two links each, as when a
    # hard-linked file is deleted during the walk and its inode goes to a new one.
    spec: Spec = {"/a/first": {"size": 5000, "ino": 4242, "nlink": 2},
                  "/b/second": {"size": 7000, "ino": 4242, "nlink": 2}}
    with mounted(spec, mnt):
        run = _backup(hozon, mnt)
    assert run.returncode == 0, run.stdout + run.stderr
    listed = _listed(hozon, mnt)
    assert listed[f"{mnt}/b/second"]["size"] == 7000, "a file was stored with another file's bytes"
    assert listed[f"{mnt}/a/first"]["content"] != listed[f"{mnt}/b/second"]["content"]


def test_a_file_that_becomes_a_fifo_is_skipped_not_waited_for(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    spec: Spec = {"/now-a-fifo": {"size": 5000, "fault": "fifo"}, "/z-after": {"size": 3000}}
    with mounted(spec, mnt, attr_timeout=60):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    assert any(w.startswith(f"warning: {mnt}/now-a-fifo: ") and "regular file" in w for w in _warnings(run)), \
        run.stderr
    listed = _listed(hozon, mnt)
    assert f"{mnt}/now-a-fifo" not in listed
    _assert_restored(hozon, mnt, {"/z-after": 3000})


def test_a_file_changed_while_it_was_read_is_kept_with_a_warning(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    # Every read moves the file's mtime: what was read is kept, and the user is told it may be torn.
    spec: Spec = {"/large": {"size": 3_000_000, "fault": "changing"}, "/small": {"size": 4000, "fault": "changing"},
                  "/still": {"size": 4000}}
    with mounted(spec, mnt):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    warned = _warnings(run)
    assert f"warning: {mnt}/large: changed while it was read" in warned, warned
    assert f"warning: {mnt}/small: changed while it was read" in warned, warned
    assert len(warned) == 2, warned
    _assert_restored(hozon, mnt, {"/large": 3_000_000, "/small": 4000, "/still": 4000})


def test_directories_that_cannot_be_listed_or_vanish_are_named(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    spec: Spec = {"/unlistable": {"dir": True, "fault": "listing_eio"}, "/vanishing": {"dir": True, "fault": "vanish"},
                  "/vanishing/inside": {"size": 100}, "/zz/kept": {"size": 3000}}
    with mounted(spec, mnt, attr_timeout=60):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    warned = _warnings(run)
    assert any(w.startswith(f"warning: {mnt}/unlistable: ") for w in warned), warned
    assert any(w.startswith(f"warning: {mnt}/vanishing: ") for w in warned), warned
    listed = _listed(hozon, mnt)
    # A directory whose entries are unknown is not stored as an empty one.
    assert f"{mnt}/unlistable" not in listed and f"{mnt}/vanishing" not in listed
    _assert_restored(hozon, mnt, {"/zz/kept": 3000})


def test_unreadable_extended_attributes_do_not_cost_the_file(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    spec: Spec = {"/d/no-xattrs": {"size": 7000, "fault": "xattr_eio"}, "/d/plain": {"size": 100}}
    with mounted(spec, mnt):
        run = _backup(hozon, mnt)
    assert run.returncode == 3, run.stdout + run.stderr
    assert f"warning: {mnt}/d/no-xattrs: extended attributes could not be read: Input/output error" in \
        _warnings(run), run.stderr
    _assert_restored(hozon, mnt, {"/d/no-xattrs": 7000, "/d/plain": 100})


def test_a_stalled_read_is_named_while_the_backup_waits(hozon: Hozon, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    # A read that gets no answer for 8 s; the backup is told to name a file after 1 s of waiting.
    spec: Spec = {"/slow": {"size": 4000, "fault": "stall", "stall_s": 8}, "/fast": {"size": 3000}}
    with mounted(spec, mnt):
        hozon.env["HOZON_STALL_SECONDS"] = "1"
        proc = hozon.popen("backup", str(mnt))
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            still_running = proc.poll() is None
            stdout, rest = proc.communicate(timeout=BACKUP_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = first + rest
    assert "Traceback" not in stderr, stderr
    assert first.startswith(f"warning: {mnt}/slow: a read had no answer from its file system for 1 s"), stderr
    assert still_running, "the stalled file was named only after the backup ended"
    assert proc.returncode == 3, stdout + stderr
    assert stderr.count(f"warning: {mnt}/slow:") == 1, stderr
    _assert_restored(hozon, mnt, {"/slow": 4000, "/fast": 3000})


def test_a_stall_bound_that_is_no_number_is_refused(hozon: Hozon, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    run = hozon("backup", str(tmp_path / "src"), check=False, env={"HOZON_STALL_SECONDS": "soon"})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "HOZON_STALL_SECONDS must be a number of seconds above 0" in run.stderr


def test_a_file_under_another_process_lease_is_read_once_it_is_given_up(hozon: Hozon, tmp_path: Path) -> None:
    # A write lease (what Samba takes for a client's oplock): an open that must not wait fails at
    # once while the holder is asked to give it up; the backup must wait for that, not skip the file.
    src = tmp_path / "src"
    src.mkdir()
    leased = src / "leased"
    leased.write_bytes(b"held by a file-sharing client\n" * 100)
    fd = os.open(leased, os.O_RDWR)
    asked: list[int] = []

    def give_up(signum: int, _frame: object) -> None:
        asked.append(signum)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)

    before = signal.signal(signal.SIGIO, give_up)
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        run = _backup(hozon, src)
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        signal.signal(signal.SIGIO, before)
        os.close(fd)
    assert asked, "the backup never asked for the lease"
    assert run.returncode == 0, run.stdout + run.stderr
    target = tmp_path / "restored"
    hozon("restore", "latest", "--target", str(target))
    assert (target / str(leased).lstrip("/")).read_bytes() == leased.read_bytes()
