"""hozon repair index and hozon repair snapshots: a damaged repository checks clean again, and what is
left restores byte for byte; what was lost is named by the command."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import PASSWORD, Hozon, Run, tree_digest

from hozon.repo.backends.local import LocalBackend
from hozon.repo.locks import SHARED, Lock
from hozon.repo.repository import Repository

MiB = 1 << 20
MakeTree = Callable[[dict[str, bytes | str]], Path]


def run(hozon: Hozon, *args: str, expect: int = 0) -> Run:
    result = hozon(*args, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def backup(hozon: Hozon, source: Path) -> str:
    return str(json.loads(run(hozon, "backup", str(source), "--json").stdout)["snapshot"]["id"])


def snapshot_ids(hozon: Hozon) -> list[str]:
    return [s["id"] for s in json.loads(run(hozon, "snapshots", "--json").stdout)]


def packs(hozon: Hozon) -> list[Path]:
    return sorted(p for p in (hozon.repo / "data").rglob("*") if p.is_file())


def pack_entries(hozon: Hozon, pack: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(run(hozon, "cat", "pack", pack.name).stdout)
    return entries


def restore(hozon: Hozon, snapshot: str, target: Path, src: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Restore a snapshot of ``src`` below ``target``; the digest of what came back in src's place."""
    run(hozon, "restore", snapshot, "--target", str(target))
    return tree_digest(target / src.relative_to("/"))


def files_using(hozon: Hozon, snapshot: str, blob_ids: set[str]) -> set[str]:
    """The paths of the snapshot's files with a chunk among ``blob_ids``."""
    nodes = json.loads(run(hozon, "ls", snapshot, "--json").stdout)
    return {n["path"] for n in nodes if blob_ids & set(n.get("content", []))}


def without(digest: dict[str, tuple[str, int, bytes | str]], lost: set[str], src: Path) -> dict[str, Any]:
    """The source's digest with the lost files taken out (their relative paths below src)."""
    gone = {str(Path(p).relative_to(src)) for p in lost}
    return {k: v for k, v in digest.items() if k not in gone}


# -- repair index ---------------------------------------------------------------------------------
def test_a_deleted_index_file_is_rebuilt_from_the_packs(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    src = make_tree({"big.bin": os.urandom(3 * MiB), "docs/a.txt": "alpha\n" * 1000, "docs/b.txt": "beta"})
    first = backup(hozon, src)
    (src / "docs" / "c.txt").write_text("gamma")
    second = backup(hozon, src)
    index_files = sorted((hozon.repo / "index").iterdir())
    assert len(index_files) == 2
    index_files[0].unlink()
    assert run(hozon, "check", expect=1).returncode == 1

    out = run(hozon, "repair", "index").stdout
    assert "1 index file(s) written, 1 removed" in out  # both packs in one new file, the old one gone
    assert len(list((hozon.repo / "index").iterdir())) == 1
    assert run(hozon, "check", "--read-data").stdout.strip().endswith("no errors were found")
    assert restore(hozon, second, tmp_path / "r2", src) == tree_digest(src)
    (src / "docs" / "c.txt").unlink()
    assert restore(hozon, first, tmp_path / "r1", src) == tree_digest(src)


def test_an_unreadable_pack_is_reported_and_left_alone(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    src = make_tree({"a.txt": "a", "b.bin": os.urandom(100_000)})
    snapshot = backup(hozon, src)
    stray = hozon.repo / "data" / "ee" / ("ee" * 32)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"not a pack")
    result = run(hozon, "repair", "index", expect=3)
    assert "warning: left out of the index" in result.stdout and stray.name in result.stdout
    assert stray.exists()
    doc = json.loads(run(hozon, "repair", "index", "--json", expect=3).stdout)
    assert len(doc["unreadable_packs"]) == 1 and doc["packs"] == 1
    assert run(hozon, "check").stdout.strip().endswith("no errors were found")
    assert restore(hozon, snapshot, tmp_path / "r", src) == tree_digest(src)


def test_a_healthy_unencrypted_index_survives_its_identical_rebuild(make_tree: MakeTree, tmp_path: Path) -> None:
    plain = Hozon(tmp_path / "plain")
    run(plain, "init", "--insecure-no-encryption")
    src = make_tree({"a.txt": "a"})
    snapshot = backup(plain, src)
    (index_file,) = (plain.repo / "index").iterdir()
    run(plain, "repair", "index")  # unsealed bytes are deterministic: the new file has the old one's name
    assert [f.name for f in (plain.repo / "index").iterdir()] == [index_file.name]
    assert run(plain, "check").stdout.strip().endswith("no errors were found")
    assert restore(plain, snapshot, tmp_path / "r", src) == tree_digest(src)


def index_listing(hozon: Hozon) -> dict[str, int]:
    """Pack → condemned_at, over every index file."""
    listing: dict[str, int] = {}
    for f in (hozon.repo / "index").iterdir():
        for pack in json.loads(run(hozon, "cat", "index", f.name).stdout):
            listing[pack["pack"]] = pack["condemned_at"]
    return listing


def test_a_condemned_pack_stays_condemned(hozon: Hozon, make_tree: MakeTree, tmp_path: Path) -> None:
    src = make_tree({"old/a.bin": os.urandom(100_000), "new/b.bin": os.urandom(100_000)})
    old = backup(hozon, src / "old")
    (condemned_pack,) = packs(hozon)
    kept = backup(hozon, src / "new")
    repo = Repository.open(LocalBackend(hozon.repo), PASSWORD)
    with Lock(repo, SHARED, "a backup that started before the prune"):  # so prune must wait
        run(hozon, "forget", old, "--prune")
    before = index_listing(hozon)
    assert before[condemned_pack.name] > 0 and condemned_pack.exists()

    run(hozon, "repair", "index")
    assert index_listing(hozon) == before  # still condemned, with its stamp: never used for deduplication
    run(hozon, "prune")
    assert not condemned_pack.exists()
    assert run(hozon, "check", "--read-data").stdout.strip().endswith("no errors were found")
    assert snapshot_ids(hozon) == [kept]


# -- repair snapshots -----------------------------------------------------------------------------
@pytest.fixture
def lost_pack(hozon: Hozon, make_tree: MakeTree) -> tuple[Path, list[str], set[str], set[str]]:
    """Two snapshots of a tree whose data fills several packs; one pack of data blobs only is deleted.

    Gives the source, the snapshot ids, and the files each snapshot lost (first, second together).
    """
    files: dict[str, bytes | str] = {f"big/{i}.bin": os.urandom(6 * MiB) for i in range(6)}
    files.update({f"small/{i}.txt": f"small file {i}\n" * 50 for i in range(20)})
    src = make_tree(files)
    first = backup(hozon, src)
    (src / "later.bin").write_bytes(os.urandom(MiB))
    second = backup(hozon, src)
    data_only = [p for p in packs(hozon) if {e["type"] for e in pack_entries(hozon, p)} == {"data"}]
    assert data_only, "the test needs a pack without tree blobs"
    victim = data_only[0]
    ids = {e["id"] for e in pack_entries(hozon, victim)}
    lost = files_using(hozon, first, ids) | files_using(hozon, second, ids)
    assert lost and lost < {str(src / name) for name in [*files, "later.bin"]}
    victim.unlink()
    return src, [first, second], lost, ids


def test_a_lost_pack_costs_only_the_files_that_used_it(
    hozon: Hozon, lost_pack: tuple[Path, list[str], set[str], set[str]], tmp_path: Path
) -> None:
    src, originals, lost, _ids = lost_pack
    assert run(hozon, "check", expect=1).returncode == 1

    dry = run(hozon, "repair", "snapshots", "--dry-run", "--forget").stdout
    assert all(f"{path}: left out: part of its content is lost" in dry for path in lost), dry
    assert "dry run: nothing was written or deleted" in dry
    assert snapshot_ids(hozon) == originals and run(hozon, "check", expect=1).returncode == 1

    result = run(hozon, "repair", "snapshots", "--forget")
    for path in lost:
        assert f"{path}: left out: part of its content is lost" in result.stdout
    assert "1 missing pack(s) dropped from the index" in result.stdout
    assert "2 original snapshot(s) removed" in result.stdout
    assert run(hozon, "check").stdout.strip().endswith("no errors were found")

    snaps = json.loads(run(hozon, "snapshots", "--json").stdout)
    assert [s["extra"]["repaired_from"] for s in snaps] == originals
    assert all("repaired" in s["tags"] for s in snaps)
    latest = restore(hozon, snaps[1]["id"], tmp_path / "r2", src)
    assert latest == without(tree_digest(src), lost, src)
    (src / "later.bin").unlink()
    assert restore(hozon, snaps[0]["id"], tmp_path / "r1", src) == without(tree_digest(src), lost, src)

    assert "no snapshot needs repair" in run(hozon, "repair", "snapshots").stdout
    backup(hozon, src)  # the next backup reads the lost files again: nothing refers to the lost chunks
    assert run(hozon, "check", "--read-data").stdout.strip().endswith("no errors were found")


def test_without_forget_the_originals_stay_and_are_not_repaired_twice(
    hozon: Hozon, lost_pack: tuple[Path, list[str], set[str], set[str]]
) -> None:
    _src, originals, _lost, _ids = lost_pack
    doc = json.loads(run(hozon, "repair", "snapshots", "--json").stdout)
    assert [s["snapshot"] for s in doc["snapshots"]] == originals and doc["forgotten"] == []
    repaired = [s["repaired"] for s in doc["snapshots"]]
    assert set(snapshot_ids(hozon)) == set(originals) | set(repaired)
    again = run(hozon, "repair", "snapshots", expect=3).stdout
    assert again.count("already repaired as") == 2
    assert len(snapshot_ids(hozon)) == 4
    forgotten = json.loads(run(hozon, "repair", "snapshots", "--forget", "--json").stdout)
    assert forgotten["forgotten"] == originals
    assert snapshot_ids(hozon) == repaired
    assert run(hozon, "check").stdout.strip().endswith("no errors were found")


def test_a_directory_whose_listing_is_lost_comes_back_empty(hozon: Hozon, make_tree: MakeTree,
                                                            tmp_path: Path) -> None:
    files: dict[str, bytes | str] = {f"many/{'n' * 60}{i:04}.txt": f"{i}\n" for i in range(300)}
    files.update({"keep/a.txt": "a", "top.bin": os.urandom(200_000)})
    src = make_tree(files)
    original = backup(hozon, src)
    pack, entry = max(((p, e) for p in packs(hozon) for e in pack_entries(hozon, p) if e["type"] == "tree"),
                      key=lambda pe: pe[1]["length"])  # the listing of many/: the biggest tree
    data = bytearray(pack.read_bytes())
    data[entry["offset"] + entry["length"] // 2] ^= 0x10
    pack.write_bytes(bytes(data))

    out = run(hozon, "repair", "snapshots", "--forget").stdout
    assert f"{src / 'many'}: emptied: its listing is lost" in out
    (repaired,) = snapshot_ids(hozon)
    assert repaired != original
    assert run(hozon, "check").stdout.strip().endswith("no errors were found")
    restored = restore(hozon, repaired, tmp_path / "r", src)
    expected = {k: v for k, v in tree_digest(src).items() if not k.startswith("many/")}
    assert restored == expected and restored["many"][0] == "dir"


def test_read_data_finds_damaged_chunks_and_prune_then_removes_them(hozon: Hozon, make_tree: MakeTree,
                                                                    tmp_path: Path) -> None:
    src = make_tree({"victim.bin": os.urandom(3 * MiB), "other.bin": os.urandom(3 * MiB), "small.txt": "s"})
    backup(hozon, src)
    pack, entry = max(((p, e) for p in packs(hozon) for e in pack_entries(hozon, p) if e["type"] == "data"),
                      key=lambda pe: pe[1]["length"])
    (victim,) = files_using(hozon, "latest", {entry["id"]})
    data = bytearray(pack.read_bytes())
    data[entry["offset"] + entry["length"] // 2] ^= 0x10
    pack.write_bytes(bytes(data))

    assert "no snapshot needs repair" in run(hozon, "repair", "snapshots").stdout  # the structure is whole
    out = run(hozon, "repair", "snapshots", "--read-data", "--forget").stdout
    assert f"{victim}: left out: part of its content is lost" in out
    assert "hozon prune --repack-threshold 1" in out
    run(hozon, "prune", "--repack-threshold", "1")
    assert not pack.exists()
    assert run(hozon, "check", "--read-data").stdout.strip().endswith("no errors were found")
    (repaired,) = snapshot_ids(hozon)
    assert restore(hozon, repaired, tmp_path / "r", src) == without(tree_digest(src), {victim}, src)


def test_repair_snapshots_needs_a_sound_index_first(hozon: Hozon, make_tree: MakeTree) -> None:
    backup(hozon, make_tree({"a.txt": "a"}))
    for f in (hozon.repo / "index").iterdir():
        f.unlink()
    result = run(hozon, "repair", "snapshots", expect=1)
    assert "hozon repair index" in result.stderr
    run(hozon, "repair", "index")
    assert "no snapshot needs repair" in run(hozon, "repair", "snapshots").stdout


@pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
                    reason="needs qemu-img and qemu-nbd (Debian qemu-utils); CI installs them")
def test_an_image_snapshot_with_lost_chunks_is_not_repaired(hozon: Hozon, tmp_path: Path) -> None:
    image = tmp_path / "vda.raw"
    image.write_bytes(os.urandom(2 * MiB))
    run(hozon, "vm", "backup", "--image", str(image), "--name", "off1")
    (snapshot,) = snapshot_ids(hozon)
    for pack in packs(hozon):
        pack.unlink()
    result = run(hozon, "repair", "snapshots", "--forget", expect=3)
    assert "image snapshots are not repaired" in result.stdout
    assert snapshot_ids(hozon) == [snapshot]  # kept: forget it once nothing more can be got from it
