"""forget and prune: space comes back, kept snapshots stay whole, and a running backup never loses data.

Most tests drive the real ``hozon`` command. The grace-rule tests at the end call the prune library
in this process against a repository made by the command, with lock files written by hand to set
up an exact lock timeline (a backup that loaded the index before prune condemned its packs).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hozon import compress
from hozon.backup.files import BackupOptions, backup_files
from hozon.repo.backends.base import Entry
from hozon.repo.backends.local import LocalBackend
from hozon.repo.pack import DATA, PackBuilder, blob_aad, pack_key
from hozon.repo.prune import execute_prune, plan_prune
from hozon.repo.repository import Repository
from hozon.repo.writer import pack_record

if TYPE_CHECKING:
    from conftest import Hozon

MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------------------
def run(hozon: Hozon, *args: str, check: bool = True) -> Any:
    result = hozon(*args, check=check)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def run_json(hozon: Hozon, *args: str) -> Any:
    return json.loads(run(hozon, *args, "--json").stdout)


def backup(hozon: Hozon, *args: str) -> dict[str, Any]:
    snapshot: dict[str, Any] = run_json(hozon, "backup", *args)["snapshot"]
    return snapshot


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def contents(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[str((Path(dirpath) / name).relative_to(root))] = None
        for name in files:
            out[str((Path(dirpath) / name).relative_to(root))] = (Path(dirpath) / name).read_bytes()
    return out


def restored(hozon: Hozon, snapshot_id: str, source: Path, target: Path) -> dict[str, bytes | None]:
    run(hozon, "restore", snapshot_id, "--target", str(target))
    return contents(target / source.relative_to("/"))


def data_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def pack_names(repo: Path) -> set[str]:
    return {p.name for p in (repo / "data").rglob("*") if p.is_file()}


def listing(repo: Path) -> dict[str, str]:
    """Every file of the repository (locks and temporary files aside) → SHA-256 of its bytes."""
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in repo.rglob("*") if p.is_file() and p.relative_to(repo).parts[0] not in ("locks", "tmp")}


def snapshot_ids(hozon: Hozon) -> list[str]:
    return [s["id"] for s in run_json(hozon, "snapshots")]


def check_repository(hozon: Hozon) -> None:
    """``hozon check --read-data`` when that command exists (it is being written alongside prune)."""
    if hozon("check", "--help", check=False).returncode != 0:
        return
    result = run(hozon, "check", "--read-data", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def wait_for_new_pack(repo: Path, before: set[str], proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Until the running backup has uploaded a pack (so it has loaded the index and is writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pack_names(repo) - before:
            return
        assert proc.poll() is None, f"the backup ended before it could be caught running: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError("the backup wrote no pack in time")


# -- forget ---------------------------------------------------------------------------------------
def test_forget_keep_last_then_prune_gives_space_back(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "stable.bin", 2 * MiB)
    ids = []
    for version in range(3):
        for old in src.glob("v*.bin"):
            old.unlink()
        write_random(src / f"v{version}.bin", 8 * MiB)
        ids.append(backup(hozon, str(src))["id"])
    expected = contents(src)
    before = data_bytes(hozon.repo)

    out = run(hozon, "forget", "--keep-last", "1").stdout
    assert "last snapshot" in out and "removed 2 snapshot(s)" in out
    assert snapshot_ids(hozon) == [ids[2]]
    assert data_bytes(hozon.repo) == before  # forget alone deletes no data

    result = run_json(hozon, "prune")["result"]
    after = data_bytes(hozon.repo)
    assert after < before - 15 * MiB, (before, after)  # the two 8 MiB versions are gone
    assert result["packs_deleted"] >= 1 and result["bytes_freed"] > 15 * MiB
    assert result["condemned_kept"] == 0

    check_repository(hozon)
    assert restored(hozon, ids[2], src, tmp_path / "restore") == expected
    again = run_json(hozon, "prune")  # a second prune finds nothing to do
    assert again["result"]["packs_deleted"] == 0 and again["plan"]["repack"]["packs"] == 0


def test_forget_with_prune_groups_by_host_and_keeps_tags(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "f", 1000)
    a1 = backup(hozon, str(src), "--host", "alpha", "--tag", "release")["id"]
    a2 = backup(hozon, str(src), "--host", "alpha")["id"]
    a3 = backup(hozon, str(src), "--host", "alpha")["id"]
    b1 = backup(hozon, str(src), "--host", "beta")["id"]
    b2 = backup(hozon, str(src), "--host", "beta")["id"]

    doc = run_json(hozon, "forget", "--keep-last", "1", "--keep-tag", "release", "--host", "alpha", "--prune")
    assert sorted(doc["removed"]) == sorted([a2])
    [group] = doc["groups"]
    assert group["group"] == {"host": "alpha", "paths": [str(src)]}
    reasons = {s["id"]: s["reasons"] for s in group["keep"]}
    assert reasons == {a3: ["last snapshot"], a1: ["tag 'release'"]}
    assert doc["prune"]["result"] is not None
    assert sorted(snapshot_ids(hozon)) == sorted([a1, a3, b1, b2])  # beta was not considered

    doc = run_json(hozon, "forget", "--keep-last", "1", "--group-by", "")  # one group for all
    assert len(doc["groups"]) == 1 and len(doc["removed"]) == 3

    doc = run_json(hozon, "forget", snapshot_ids(hozon)[0][:10])  # by id prefix
    assert len(doc["removed"]) == 1 and snapshot_ids(hozon) == []


def test_forget_without_a_policy_is_a_usage_error_and_removes_nothing(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "f", 1000)
    backup(hozon, str(src))
    backup(hozon, str(src))
    files = listing(hozon.repo)

    result = run(hozon, "forget", check=False)
    assert result.returncode == 2
    assert "would remove every snapshot" in result.stderr
    result = run(hozon, "forget", "--keep-last", "0", "--prune", check=False)  # zero counts keep nothing
    assert result.returncode == 2
    for bad in (["--keep-last", "1", snapshot_ids(hozon)[0]], ["--keep-last", "1", "--group-by", "colour"],
                ["--keep-daily", "-1"], ["--keep-last", "1", "--repack-threshold", "1.5"]):
        result = run(hozon, "forget", *bad, check=False)
        assert result.returncode == 2, (bad, result.stderr)
    result = run(hozon, "forget", "0000000000", check=False)
    assert result.returncode == 1 and "no snapshot matches" in result.stderr
    assert listing(hozon.repo) == files


def test_dry_runs_change_nothing(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "a", 3 * MiB)
    backup(hozon, str(src))
    write_random(src / "a", 3 * MiB)
    backup(hozon, str(src))
    files = listing(hozon.repo)

    out = run(hozon, "forget", "--keep-last", "1", "--dry-run", "--prune").stdout
    assert "would remove 1 snapshot(s)" in out and "dry run: nothing was written or deleted" in out
    assert "condemn" in out  # the plan counts the forgotten snapshot as gone
    doc = run_json(hozon, "forget", "--keep-last", "1", "--dry-run", "--prune")
    assert doc["prune"]["result"] is None and doc["prune"]["plan"]["condemn"]["packs"] >= 1
    doc = run_json(hozon, "prune", "--dry-run")
    assert doc["result"] is None
    assert listing(hozon.repo) == files
    assert not list((hozon.repo / "locks").iterdir())


# -- prune ----------------------------------------------------------------------------------------
def test_partly_used_packs_are_repacked(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("a", "b", "c"):  # backed up in name order: one pack holds a, b and part of c
        write_random(src / name, 6 * MiB)
    first = backup(hozon, str(src))["id"]
    (src / "b").unlink()
    write_random(src / "d", 6 * MiB)
    second = backup(hozon, str(src))["id"]
    expected = contents(src)
    before = data_bytes(hozon.repo)

    run(hozon, "forget", first)
    doc = run_json(hozon, "prune")
    plan, result = doc["plan"], doc["result"]
    assert plan["repack"]["packs"] >= 1 and 0 < plan["repack"]["copy_bytes"] < plan["repack"]["bytes"]
    assert result["packs_written"] >= 1 and result["bytes_copied"] == plan["repack"]["copy_bytes"]
    assert result["condemned_kept"] == 0
    assert data_bytes(hozon.repo) < before - 5 * MiB  # b's 6 MiB are gone

    check_repository(hozon)
    assert restored(hozon, second, src, tmp_path / "r1") == expected
    again = run_json(hozon, "prune")["plan"]  # what was repacked is now fully used
    assert again["repack"]["packs"] == 0 and again["condemn"]["packs"] == 0


def test_prune_is_safe_while_a_backup_runs(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write_random(src / "old" / f"f{i}", 5 * MiB)
    first = backup(hozon, str(src))["id"]
    for i in range(6):  # enough new data that the backup uploads packs while it runs
        write_random(src / "zz_new" / f"g{i}", 12 * MiB)
    expected = contents(src)
    packs_before = pack_names(hozon.repo)

    # The backup loads the index (the old files' chunks are live in it), reuses the old files' chunks
    # (they come first by name), and is frozen once it has uploaded its first pack.
    proc = hozon.popen("backup", "--json", str(src))
    try:
        wait_for_new_pack(hozon.repo, packs_before, proc)
        os.kill(proc.pid, signal.SIGSTOP)
        run(hozon, "forget", first)  # no snapshot is left: every pack is unused now
        assert snapshot_ids(hozon) == []
        doc = run_json(hozon, "prune")
        plan, result = doc["plan"], doc["result"]
        assert plan["condemn"]["packs"] == len(packs_before)
        assert plan["unindexed"]["condemned"] >= 1  # the running backup's packs, not indexed yet
        assert any("backup" in b for b in plan["blockers"])
        assert result["packs_deleted"] == 0 and result["condemned_kept"] >= len(packs_before) + 1
        assert packs_before <= pack_names(hozon.repo)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    second = json.loads(out)["snapshot"]
    assert second["summary"]["files_unmodified"] == 3  # it did reference the condemned old chunks

    assert restored(hozon, second["id"], src, tmp_path / "r1") == expected
    doc = run_json(hozon, "prune")  # the backup is over: the old chunks are in use, their packs live again
    assert doc["plan"]["resurrect"]["packs"] >= 1
    check_repository(hozon)
    assert restored(hozon, second["id"], src, tmp_path / "r2") == expected
    assert run_json(hozon, "prune")["plan"]["resurrect"]["packs"] == 0  # and it settles


def test_prune_deletes_the_packs_of_a_killed_backup(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "keep", 2 * MiB)
    first = backup(hozon, str(src))["id"]
    packs_before = pack_names(hozon.repo)
    for i in range(4):
        write_random(src / "zz_big" / f"g{i}", 12 * MiB)
    proc = hozon.popen("backup", str(src))
    wait_for_new_pack(hozon.repo, packs_before, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert pack_names(hozon.repo) > packs_before  # its packs are in no index

    doc = run_json(hozon, "prune")  # its lock is stale (process gone): nothing can use those packs
    assert doc["plan"]["unindexed"]["condemned"] >= 1
    assert doc["result"]["packs_deleted"] >= 1 and doc["result"]["condemned_kept"] == 0
    assert pack_names(hozon.repo) == packs_before
    check_repository(hozon)
    (src / "zz_big").rename(tmp_path / "moved_away")
    assert restored(hozon, first, src, tmp_path / "r") == contents(src)


def test_prune_refuses_to_touch_a_damaged_repository(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "a", 3 * MiB)
    first = backup(hozon, str(src))["id"]
    write_random(src / "b", 3 * MiB)
    backup(hozon, str(src))
    run(hozon, "forget", first)
    for index_file in (hozon.repo / "index").iterdir():  # lose the index: blobs in use are in no index
        index_file.unlink()
    files = listing(hozon.repo)
    result = run(hozon, "prune", check=False)
    assert result.returncode == 1
    assert "prune stopped before changing anything" in result.stderr and "hozon check" in result.stderr
    assert listing(hozon.repo) == files


# -- the grace rule, on an exact lock timeline (library calls) ------------------------------------
def open_library_repo(hozon: Hozon) -> Repository:
    repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
    repo.load_index()
    return repo


def fake_lock(repo: Repository, started: float, refreshed: float | None = None) -> str:
    """A lock file as another host's backup writes it (docs/format.md, Locks)."""
    doc = {"kind": "shared", "hostname": "another-host", "pid": 4242, "command": "backup",
           "started": started, "refreshed": time.time() if refreshed is None else refreshed}
    name = os.urandom(16).hex()
    repo.backend.put(f"locks/{name}", repo.seal(json.dumps(doc).encode(), b"lock"))
    return name


def prune_now(hozon: Hozon) -> tuple[Any, Any]:
    repo = open_library_repo(hozon)
    plan = plan_prune(repo)
    return plan, execute_prune(repo, plan)


def test_grace_rule_with_a_backup_that_loaded_the_index_before_the_condemnation(
    hozon: Hozon, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_random(src / "x", 3 * MiB)
    first = backup(hozon, str(src))["id"]
    packs = pack_names(hozon.repo)

    # A backup starts: takes its lock, loads the index (x's chunks are live in it)…
    running = open_library_repo(hozon)
    lock = fake_lock(running, started=time.time())
    time.sleep(1.1)  # condemned_at has one-second resolution
    # …and meanwhile its only snapshot is forgotten and prune runs.
    run(hozon, "forget", first)
    plan, result = prune_now(hozon)
    assert sorted(plan.condemn) == sorted(packs) and result.packs_deleted == 0
    assert any("another-host" in h for h in result.held_by)
    assert pack_names(hozon.repo) == packs

    plan, result = prune_now(hozon)  # while it runs, a second prune waits too
    assert sorted(plan.waiting) == sorted(packs) and not plan.delete and result.packs_deleted == 0

    snap = backup_files(running, BackupOptions(paths=[str(src)])).snapshot  # it finishes, reusing x
    assert snap.summary["data_added"] < MiB
    running.backend.delete(f"locks/{lock}")
    assert restored(hozon, snap.id, src, tmp_path / "r1") == contents(src)

    plan, result = prune_now(hozon)  # its snapshot uses the condemned packs: they are live again
    assert set(plan.resurrect) >= {n for n in packs if plan.packs[n].used_blobs}
    assert result.packs_deleted == 0
    check_repository(hozon)
    assert restored(hozon, snap.id, src, tmp_path / "r2") == contents(src)


def test_grace_rule_lets_later_and_stale_locks_pass(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "x", 3 * MiB)
    first = backup(hozon, str(src))["id"]
    packs = pack_names(hozon.repo)
    run(hozon, "forget", first)
    repo = open_library_repo(hozon)
    fake_lock(repo, started=time.time() + 3600)  # started after any condemnation of this run
    fake_lock(repo, started=time.time() - 7200, refreshed=time.time() - 7200)  # stale: its holder is gone
    plan, result = prune_now(hozon)
    assert sorted(plan.condemn) == sorted(packs)
    assert result.packs_deleted == len(packs) and result.condemned_kept == 0
    assert pack_names(hozon.repo) == set()


def test_nothing_is_deleted_when_a_snapshot_appears_during_prune(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_random(src / "x", 3 * MiB)
    first = backup(hozon, str(src))["id"]
    packs = pack_names(hozon.repo)
    run(hozon, "forget", first)

    repo = open_library_repo(hozon)
    plan = plan_prune(repo)
    assert sorted(plan.condemn) == sorted(packs) and not plan.blockers
    # A backup that loaded the index before the plan finishes (and releases its lock) meanwhile.
    early = open_library_repo(hozon)
    snap = backup_files(early, BackupOptions(paths=[str(src)])).snapshot
    assert snap.summary["data_added"] < MiB  # it reused x's chunks, which the plan counts as unused
    result = execute_prune(repo, plan)
    assert result.packs_deleted == 0 and any("saved while prune ran" in h for h in result.held_by)
    assert restored(hozon, snap.id, src, tmp_path / "r1") == contents(src)
    plan, result = prune_now(hozon)
    assert plan.resurrect and result.packs_deleted == 0
    check_repository(hozon)
    assert restored(hozon, snap.id, src, tmp_path / "r2") == contents(src)


@pytest.mark.parametrize("threshold", ["0", "1"])
def test_repack_threshold_bounds(hozon: Hozon, tmp_path: Path, threshold: str) -> None:
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        write_random(src / name, 6 * MiB)
    first = backup(hozon, str(src))["id"]
    (src / "b").unlink()
    second = backup(hozon, str(src))["id"]
    run(hozon, "forget", first)
    plan = run_json(hozon, "prune", "--repack-threshold", threshold)["plan"]
    if threshold == "0":
        assert plan["repack"]["packs"] == 0  # never repack
    else:
        assert plan["repack"]["packs"] >= 1  # anything not fully used
    assert restored(hozon, second, src, tmp_path / "r") == contents(src)


def test_a_backup_starting_while_prune_rewrites_the_index_is_protected(hozon: Hozon, tmp_path: Path) -> None:
    """A backup that starts after prune planned, but loads the index before the old files are gone,
    still sees the unused packs live; they are stamped only after that, so it holds them."""
    src = tmp_path / "src"
    write_random(src / "x", 3 * MiB)
    first = backup(hozon, str(src))["id"]
    packs = pack_names(hozon.repo)
    run(hozon, "forget", first)

    repo = open_library_repo(hozon)
    plan = plan_prune(repo)
    time.sleep(1.1)  # the backup starts clearly after the plan was made
    late: list[Repository] = []

    def progress(message: str) -> None:
        if message == "writing the new index":  # old index files still there: the packs look live
            late.append(open_library_repo(hozon))
            fake_lock(late[0], started=time.time())

    result = execute_prune(repo, plan, progress=progress)
    assert late and result.packs_deleted == 0 and result.condemned_kept == len(packs)
    plan, result = prune_now(hozon)  # the lock is still there: the packs wait
    assert sorted(plan.waiting) == sorted(packs) and result.packs_deleted == 0

    snap = backup_files(late[0], BackupOptions(paths=[str(src)])).snapshot
    assert snap.summary["data_added"] < MiB  # x's 3 MiB: it reused the condemned chunks
    assert restored(hozon, snap.id, src, tmp_path / "r") == contents(src)


def test_a_pack_indexed_while_prune_runs_is_never_deleted(hozon: Hozon, tmp_path: Path) -> None:
    """A backup uploads a pack, prune plans (the pack is in no index), the backup writes its index
    file and then stops without a snapshot: that index file lists the pack live, so it must stay."""
    src = tmp_path / "src"
    write_random(src / "x", 1 * MiB)
    first = backup(hozon, str(src))["id"]

    stopped = open_library_repo(hozon)
    builder = PackBuilder(stopped.cipher)
    blob = os.urandom(100_000)
    blob_id = stopped.master.chunk_id(blob)
    builder.add(DATA, blob_id, stopped.cipher.seal(compress.compress(blob), blob_aad(DATA, blob_id)), len(blob))
    name, data = builder.finish()
    stopped.backend.put(pack_key(name), data)

    repo = open_library_repo(hozon)
    plan = plan_prune(repo)
    assert [r.name for r in plan.adopt_condemned] == [name]
    stopped.write_index([pack_record(name, builder.entries)])  # its index file, after the plan
    result = execute_prune(repo, plan)
    assert name in pack_names(hozon.repo) and result.packs_deleted == 0

    after = open_library_repo(hozon)
    assert after.index.has_live(blob_id) and after.load_blob(blob_id) == blob
    assert restored(hozon, first, src, tmp_path / "r") == contents(src)
    check_repository(hozon)


def test_loading_the_index_while_prune_replaces_it_lists_again(hozon: Hozon, tmp_path: Path) -> None:
    """A backup starting during prune may list an index file that prune deletes before it is read."""
    src = tmp_path / "src"
    write_random(src / "x", 1000)
    backup(hozon, str(src))

    class Racing(LocalBackend):
        listed = 0

        def list(self, prefix: str) -> Iterator[Entry]:
            if prefix == "index" and not self.listed:
                self.listed += 1
                yield Entry("index/" + "0" * 64, 100)  # listed, then deleted by prune before it is read
            yield from super().list(prefix)

    repo = Repository.open(Racing(hozon.repo), hozon.env["HOZON_PASSWORD"])
    repo.load_index()
    assert len(repo.index) > 0 and "0" * 64 not in repo.index_files


def test_prune_removes_day_old_interrupted_uploads_and_leaves_young_ones(hozon: Hozon, tmp_path: Path) -> None:
    write_random(tmp_path / "src" / "a", 1000)
    backup(hozon, str(tmp_path / "src"))
    tmp = Path(hozon.repo) / "tmp"
    old, young = tmp / "old.tmp", tmp / "young.tmp"
    old.write_bytes(b"half a pack")  # what a backup killed mid-write leaves
    young.write_bytes(b"a write in progress")
    os.utime(old, (time.time() - 2 * 24 * 3600,) * 2)
    assert run_json(hozon, "prune", "--dry-run")["plan"]["tmp_files"] == 1 and old.exists()
    assert "removed 1 old temporary file(s)" in run(hozon, "prune").stdout
    assert not old.exists() and young.exists()
    assert run(hozon, "check").returncode == 0
