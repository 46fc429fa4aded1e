"""Repository locks through the real command: kept or refused, waited for, skipped on a read-only repository.

A backup is held in the middle of its work by a FUSE source whose reads wait at a gate
(``gatedfs.py``), so a test can take the lock away, make ``locks/`` read-only or press Ctrl-C at
a known moment. Shortened lock intervals come from HOZON_LOCK_REFRESH_EVERY and
HOZON_LOCK_STALE_AFTER (``hozon.repo.locks``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.e2e.test_reliability import check_passes, run_ok, snapshot_ids, wait_for

from hozon.repo.backends.local import LocalBackend
from hozon.repo.locks import EXCLUSIVE, Lock
from hozon.repo.repository import Repository

if TYPE_CHECKING:
    from conftest import Hozon

pytestmark = pytest.mark.timeout(300)

FAST_LOCKS = {"HOZON_LOCK_REFRESH_EVERY": "0.3", "HOZON_LOCK_STALE_AFTER": "6"}  # lost after 3 s unrefreshed


@dataclass
class GatedSource:
    path: Path  # the directory to back up
    gate: Path  # reads wait while it exists
    reading: Path  # appears when a read waits

    def open(self) -> None:
        self.gate.unlink(missing_ok=True)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedSource]:
    source = GatedSource(tmp_path / "gated", tmp_path / "gate", tmp_path / "reading")
    source.path.mkdir()
    source.gate.touch()
    fs = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gatedfs.py")), str(source.path),
                           str(source.gate), str(source.reading), str(4 * 1024 * 1024)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(source.path):
            if fs.poll() is not None or time.monotonic() > deadline:
                fs.kill()
                pytest.fail(f"the FUSE test file system did not mount: {fs.communicate()[0]}")
            time.sleep(0.05)
        yield source
    finally:
        source.open()
        subprocess.run(["fusermount3", "-u", "-z", str(source.path)], check=False)
        fs.terminate()
        fs.wait(10)


@contextlib.contextmanager
def read_only(path: Path, at: Path | None = None) -> Iterator[Path]:
    """``path`` (or a view of it at ``at``) read-only for root too: a read-only bind mount."""
    point = at or path
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(point)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(point)], check=True)
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def start_backup(hozon: Hozon, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hozon", "backup", *args], env={**hozon.env, **(env or {})},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def held_at_gate(proc: subprocess.Popen[str], source: GatedSource) -> None:
    wait_for(source.reading.exists, proc, "the backup reached its source")


def saved_snapshot(stdout: str) -> str:
    found = re.search(r"^snapshot (\w+) saved$", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def open_repository(hozon: Hozon) -> Repository:
    return Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])


# -- a lock that cannot be kept -------------------------------------------------------------------
def test_a_backup_whose_lock_was_removed_saves_no_snapshot(hozon: Hozon, gated: GatedSource) -> None:
    proc = start_backup(hozon, str(gated.path), env=FAST_LOCKS)
    held_at_gate(proc, gated)
    run = run_ok(hozon, "unlock", "--remove-all")  # e.g. someone who thought the backup was dead
    assert "1 lock(s) removed" in run.stdout
    time.sleep(1.5)  # a few refreshes
    gated.open()
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1, out + err
    assert "Traceback" not in err, err
    assert "the repository lock was lost" in err and "was removed by another process" in err, err
    assert "no snapshot was saved" in err, err
    assert snapshot_ids(hozon) == []
    check_passes(hozon)


def test_a_backup_that_cannot_refresh_its_lock_says_so_and_saves_no_snapshot(
        hozon: Hozon, gated: GatedSource) -> None:
    proc = start_backup(hozon, str(gated.path), env=FAST_LOCKS)
    held_at_gate(proc, gated)
    with read_only(hozon.repo / "locks"):
        time.sleep(4.5)  # past the 3 s the lock may go unrefreshed
    gated.open()  # the storage works again: too late, a prune could have taken the lock for stale
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 1, out + err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert "could not refresh the repository lock" in err, err
    assert err.count("could not refresh the repository lock") == 1, err  # said once, not at every retry
    assert "the repository lock was lost (not refreshed for 3 s); no snapshot was saved" in err, err
    assert snapshot_ids(hozon) == []
    check_passes(hozon)


# -- a lock that cannot be removed at the end -----------------------------------------------------
def test_a_saved_snapshot_whose_lock_cannot_be_removed_is_reported_with_its_id(
        hozon: Hozon, gated: GatedSource) -> None:
    proc = start_backup(hozon, str(gated.path))
    held_at_gate(proc, gated)
    with read_only(hozon.repo / "locks"):
        gated.open()
        out, err = proc.communicate(timeout=120)

    assert proc.returncode == 3, out + err
    assert "Traceback" not in err, err
    snapshot = saved_snapshot(out)
    assert re.search(r"hozon: warning: the work is done, but the repository lock locks/\w+ could not be removed",
                     err), err
    assert "hozon unlock" in err, err
    assert [s[:8] for s in snapshot_ids(hozon)] == [snapshot]
    check_passes(hozon)
    assert "1 lock(s) removed" in run_ok(hozon, "unlock").stdout  # stale: its process is gone


# -- waiting for a lock ---------------------------------------------------------------------------
def test_retry_lock_waits_for_a_conflicting_lock_and_without_it_the_backup_fails_at_once(
        hozon: Hozon, make_tree: object, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("waited for\n")
    holder = Lock(open_repository(hozon), EXCLUSIVE, "test holder")  # this test's process holds it
    holder.acquire()
    try:
        started = time.monotonic()
        run = hozon("backup", str(src), check=False)
        assert run.returncode == 11, run.stdout + run.stderr
        assert "locked by exclusive lock of 'test holder'" in run.stderr, run.stderr
        assert time.monotonic() - started < 15  # at once: no waiting without --retry-lock

        proc = start_backup(hozon, "--retry-lock", "20s", str(src))
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()  # still waiting for the lock
    finally:
        holder.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    snapshot = saved_snapshot(out)
    assert [s[:8] for s in snapshot_ids(hozon)] == [snapshot]

    run = hozon("snapshots", "--retry-lock", "soon", check=False)
    assert run.returncode == 2 and "'soon' is not a duration" in run.stderr, run.stderr


def test_key_passwd_waits_at_its_prompt_without_holding_the_lock(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("backed up while a password change waits\n")
    env = {k: v for k, v in hozon.env.items() if k != "HOZON_NEW_PASSWORD"}
    terminal, tty = os.openpty()

    def controlling_terminal() -> None:  # getpass talks to /dev/tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "hozon", "key", "passwd"], env=env, stdin=tty,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=controlling_terminal)
    os.close(tty)
    try:
        read_until(terminal, b"new password: ")
        run = run_ok(hozon, "backup", str(src), check=False)  # while key passwd waits at its prompt
        assert run.returncode == 0, run.stdout + run.stderr
        os.write(terminal, b"a new password\n")
        read_until(terminal, b"enter it again: ")
        os.write(terminal, b"a new password\n")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(terminal)
    assert proc.returncode == 0, out + err
    assert "password changed" in out
    listed = hozon("snapshots", "--json", env={"HOZON_PASSWORD": "a new password"})
    assert saved_snapshot(run.stdout) in listed.stdout


def read_until(fd: int, wanted: bytes, timeout: float = 30) -> None:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {wanted!r} on the terminal; got {seen!r}"
        seen += os.read(fd, 1024)


# -- reading without a lock -----------------------------------------------------------------------
def test_reading_commands_work_on_a_read_only_repository(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("read from a read-only repository\n")
    snapshot = saved_snapshot(run_ok(hozon, "backup", str(src)).stdout)
    with read_only(hozon.repo, at=tmp_path / "ro") as ro:
        env = {"HOZON_REPO": str(ro)}
        for args in (["restore", snapshot, "--target", str(tmp_path / "restored")], ["check"], ["snapshots"],
                     ["ls", snapshot], ["diff", snapshot, snapshot]):
            run = hozon(*args, env=env, check=False)
            assert run.returncode == 0, f"{args}: {run.stdout}{run.stderr}"
            assert "Traceback" not in run.stderr, run.stderr
            assert "note: " in run.stderr and "reading without a lock" in run.stderr, run.stderr
        run = hozon("snapshots", "--no-lock", env=env)
        assert run.stderr == "" and snapshot in run.stdout
        run = hozon("backup", str(src), env=env, check=False)  # writing cannot go on without a lock
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert "Read-only file system" in run.stderr, run.stderr
    restored = tmp_path / "restored" / src.relative_to("/") / "a.txt"
    assert restored.read_text() == "read from a read-only repository\n"


def test_no_lock_reads_while_an_exclusive_lock_is_held(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("listed under an exclusive lock\n")
    snapshot = saved_snapshot(run_ok(hozon, "backup", str(src)).stdout)
    with Lock(open_repository(hozon), EXCLUSIVE, "test holder"):
        assert hozon("snapshots", check=False).returncode == 11
        assert snapshot in run_ok(hozon, "snapshots", "--no-lock").stdout
        assert "a.txt" in run_ok(hozon, "ls", "--no-lock", snapshot).stdout


# -- Ctrl-C ---------------------------------------------------------------------------------------
def test_ctrl_c_during_a_backup_says_nothing_was_saved(hozon: Hozon, gated: GatedSource) -> None:
    proc = start_backup(hozon, str(gated.path))
    held_at_gate(proc, gated)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    gated.open()
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "interrupted" in lines[0] and "no snapshot was saved" in lines[0], err
    assert snapshot_ids(hozon) == []
    check_passes(hozon)
