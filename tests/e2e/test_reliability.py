"""What goes wrong in real life: a killed backup, a full disk, two backups at once, passwords.

Every case drives the real ``hozon`` command and checks what a user would: exit codes, one clear
message, a repository that still lists, checks and restores, and a next backup that just works.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hozon.repo.backends.local import LocalBackend
from hozon.repo.repository import Repository

if TYPE_CHECKING:
    from conftest import Hozon, Run

MiB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------------
def run_ok(hozon: Hozon, *args: str, **kwargs: Any) -> Run:
    run = hozon(*args, **kwargs)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def snapshot_ids(hozon: Hozon) -> list[str]:
    return [s["id"] for s in json.loads(run_ok(hozon, "snapshots", "--json").stdout)]


def check_passes(hozon: Hozon) -> None:
    """``hozon check`` (structure) accepts the repository."""
    run = hozon("check", check=False)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, f"hozon check failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"


def backup_json(hozon: Hozon, *args: str) -> dict[str, Any]:
    run = run_ok(hozon, "backup", "--json", *args)
    snapshot: dict[str, Any] = json.loads(run.stdout)["snapshot"]
    return snapshot


def digests(root: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file below ``root``."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
            out[str(path.relative_to(root))] = h.hexdigest()
    return out


def restored_digests(hozon: Hozon, snapshot: str, source: Path, target: Path) -> dict[str, str]:
    run_ok(hozon, "restore", snapshot, "--target", str(target))
    return digests(target / source.relative_to("/"))


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
        f.write(os.urandom(size % (4 * MiB)))


def count_files(directory: Path) -> int:
    return sum(len(files) for _dirpath, _dirs, files in os.walk(directory))


def unindexed_packs(hozon: Hozon) -> int:
    """Packs in the repository that no index file names (what a killed backup leaves behind)."""
    repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
    repo.load_index()
    return len(set(repo.list_packs()) - set(repo.index.packs))


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    """Poll ``condition`` until true; fails if the process ends first (the data set is too small)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"backup ended ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(kind, *options) → a fresh mount point below tmp_path; everything is unmounted afterwards."""
    points: list[Path] = []

    def mount(*args: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        proc = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount here (mount {' '.join(args)}: {proc.stderr.strip()}); needs root and "
                        "loop devices, which CI has")
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            subprocess.run(["umount", "-l", str(point)], check=False)


# -- kill -9 ----------------------------------------------------------------------------------------
def test_killed_backups_leave_a_sound_repository_and_the_next_backup_reuses_their_chunks(
    hozon: Hozon, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write_random(src / f"big{i}.bin", 100 * MiB)
    for d in range(20):
        for f in range(50):
            path = src / "small" / f"d{d:02}" / f"f{f:02}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(2000 + f * 100))
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    first = backup_json(hozon, str(tmp_path / "src" / "small"))  # an earlier, unrelated snapshot
    repo = hozon.repo
    data, index = repo / "data", repo / "index"

    def kill_when(condition: Callable[[], bool], what: str) -> None:
        proc = hozon.popen("backup", str(src))
        try:
            wait_for(condition, proc, what)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()

        assert snapshot_ids(hozon) == [first["id"]], f"a killed backup ({what}) left a snapshot"
        locks = json.loads(run_ok(hozon, "list", "locks", "--json").stdout)
        assert proc.pid in [lk["pid"] for lk in locks], locks  # the killed backup's lock is left…
        assert all(lk["stale"] for lk in locks), locks  # …and shown as stale, like any left earlier
        check_passes(hozon)

    packs_before = count_files(data)
    kill_when(lambda: count_files(data) > packs_before, "the first pack was stored")
    assert unindexed_packs(hozon) > 0
    run = run_ok(hozon, "unlock")
    assert "1 lock(s) removed" in run.stdout
    assert json.loads(run_ok(hozon, "list", "locks", "--json").stdout) == []

    # Killed a third of the way in, before its first index file (one every 8 packs): all its packs
    # are unindexed. Its stale lock is left in place: a new backup must not mind it.
    kill_when(lambda: count_files(data) >= packs_before + 6, "a third of the data was stored")
    # The next backup first indexes the packs the killed ones left unindexed (one index file), then
    # writes an index file every few packs: wait for the first of those.
    indexes = count_files(index) + (1 if unindexed_packs(hozon) else 0)
    kill_when(lambda: count_files(index) > indexes, "an index file for new packs was written")
    stored = count_files(data) - packs_before

    last = backup_json(hozon, str(src))
    assert unindexed_packs(hozon) == 0
    s = last["summary"]
    print(f"\nthe killed backups stored {stored} packs; the next one added {s['data_added'] / MiB:.1f} MiB "
          f"of {total / MiB:.1f} MiB")
    assert s["data_added"] < total / 2, "chunks stored by the killed backups were uploaded again"
    assert snapshot_ids(hozon) == [first["id"], last["id"]]
    check_passes(hozon)
    assert restored_digests(hozon, last["id"], src, tmp_path / "restore") == digests(src)


# -- a full disk ------------------------------------------------------------------------------------
def test_full_disk_fails_cleanly_and_leaves_the_repository_intact(
    tmp_path: Path, mounted: Callable[..., Path], hozon: Hozon
) -> None:
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    disk = mounted("-o", "loop", str(image))
    small = copy.copy(hozon)
    small.repo = disk / "repo"
    small.env = {**hozon.env, "HOZON_REPO": str(small.repo)}
    run_ok(small, "init")

    src = tmp_path / "src"
    (src / "notes").mkdir(parents=True)
    (src / "notes" / "a.txt").write_bytes(b"fits easily\n")
    earlier = backup_json(small, str(src / "notes"))
    write_random(src / "big" / "random.bin", 200 * MiB)

    run = small("backup", str(src / "big"), check=False)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space" in errors[0].lower(), run.stderr

    assert snapshot_ids(small) == [earlier["id"]]
    check_passes(small)
    restored = restored_digests(small, earlier["id"], src / "notes", tmp_path / "restore")
    assert restored == digests(src / "notes")


# -- concurrent writers -----------------------------------------------------------------------------
def test_two_backups_at_once_into_one_repository(hozon: Hozon, tmp_path: Path) -> None:
    shared = os.urandom(6 * MiB)  # the same content in both trees: both may store it, either copy serves
    trees = []
    for name in ("alpha", "beta"):
        root = tmp_path / name
        write_random(root / "own.bin", 40 * MiB)
        (root / "shared.bin").write_bytes(shared)
        for i in range(300):
            (root / "many" / f"{i:03}.txt").parent.mkdir(parents=True, exist_ok=True)
            (root / "many" / f"{i:03}.txt").write_bytes(f"{name} {i}\n".encode() * (i + 1))
        trees.append(root)

    procs = [hozon.popen("backup", "--json", str(root)) for root in trees]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert "Traceback" not in err, err
        assert proc.returncode == 0, out + err
    ids = [json.loads(out)["snapshot"]["id"] for out, _err in results]

    assert sorted(snapshot_ids(hozon)) == sorted(ids)
    check_passes(hozon)
    for snap, root in zip(ids, trees, strict=True):
        assert restored_digests(hozon, snap, root, tmp_path / f"restore-{root.name}") == digests(root)


# -- passwords and locations ------------------------------------------------------------------------
def test_wrong_password_missing_repository_password_file_and_key_change(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.txt").write_bytes(b"guarded by a password\n")
    snap = backup_json(hozon, str(src))

    run = hozon("snapshots", env={"HOZON_PASSWORD": "not the password"}, check=False)
    assert run.returncode == 12
    assert "Traceback" not in run.stderr and "wrong password" in run.stderr

    run = hozon("snapshots", env={"HOZON_REPO": str(tmp_path / "nowhere")}, check=False)
    assert run.returncode == 10
    assert "Traceback" not in run.stderr and str(tmp_path / "nowhere") in run.stderr

    password_file = tmp_path / "password"
    password_file.write_text(hozon.env["HOZON_PASSWORD"] + "\n")
    by_file = copy.copy(hozon)
    by_file.env = {k: v for k, v in hozon.env.items() if k != "HOZON_PASSWORD"}
    by_file.env["HOZON_PASSWORD_FILE"] = str(password_file)
    assert snapshot_ids(by_file) == [snap["id"]]
    password_file.write_text("wrong\n")
    run = by_file("snapshots", check=False)
    assert run.returncode == 12 and "Traceback" not in run.stderr

    listing = run_ok(hozon, "ls", "latest", "--json").stdout
    run_ok(hozon, "key", "passwd", env={"HOZON_NEW_PASSWORD": "a brand new password"})
    run = hozon("snapshots", check=False)
    assert run.returncode == 12 and "Traceback" not in run.stderr
    renewed = copy.copy(hozon)
    renewed.env = {**hozon.env, "HOZON_PASSWORD": "a brand new password"}
    assert snapshot_ids(renewed) == [snap["id"]]
    assert run_ok(renewed, "ls", "latest", "--json").stdout == listing
    assert restored_digests(renewed, snap["id"], src, tmp_path / "restore") == digests(src)
