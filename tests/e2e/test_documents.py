"""Authenticated files of an unexpected shape: unknown fields are ignored, wrong ones are damage.

Another Hozon version or a bug could write a tree, snapshot, config, key or lock file with an extra
field or a field of the wrong JSON type. The files here are crafted with the Python API and sealed
with the repository's key, so they pass authentication; the real ``hozon`` must then either use them
(unknown fields) or name the file as damaged in one sentence (wrong fields), never a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.e2e.test_damaged_repository import fails_with_one_sentence

from hozon.repo.backends.local import LocalBackend
from hozon.repo.pack import DATA, TREE
from hozon.repo.repository import Repository
from hozon.repo.writer import BlobWriter

if TYPE_CHECKING:
    from conftest import Hozon, Run

MakeTree = Callable[[dict[str, bytes | str]], Path]
CONTENT = b"a file kept by a sound backup\n"


class Forger:
    """Writes sealed trees, snapshots, locks and config with any content, as a buggy Hozon could."""

    def __init__(self, hozon: Hozon) -> None:
        self.hozon = hozon
        self.repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
        self.repo.load_index()

    def tree(self, doc: Any) -> str:
        with BlobWriter(self.repo) as writer:
            return writer.store(json.dumps(doc).encode(), TREE).hex()

    def snapshot(self, **fields: Any) -> str:
        doc = {"version": 1, "time": "2030-01-01T00:00:00+00:00", "hostname": "forged", "paths": ["/forged"],
               "kind": "files", "tree": self.tree({"nodes": []}), "tags": [], "parent": None, "summary": {},
               "extra": {}, **fields}
        return self.repo.save_content_addressed("snapshots", json.dumps(doc).encode(), b"snapshot")

    def lock(self, **fields: Any) -> str:
        doc = {"kind": "shared", "hostname": "elsewhere", "pid": 1, "command": "backup", "started": 1e9,
               "refreshed": 1e9, **fields}
        self.repo.backend.put("locks/" + "f" * 32, self.repo.seal(json.dumps(doc).encode(), b"lock"))
        return "locks/" + "f" * 32

    def config(self, **fields: Any) -> None:
        doc = {**self.repo.config, **fields}
        self.repo.backend.delete("config")
        self.repo.backend.put("config", self.repo.seal(json.dumps(doc).encode(), b"config"))


@pytest.fixture
def backed_up(hozon: Hozon, make_tree: MakeTree) -> tuple[Hozon, Path]:
    src = make_tree({"kept.txt": CONTENT, "big.bin": os.urandom(200_000)})
    hozon("backup", str(src))
    return hozon, src


def no_traceback(run: Run) -> Run:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    return run


def pack_of_tree(hozon: Hozon, tree_id: str) -> str:
    repo = Repository.open(LocalBackend(hozon.repo), hozon.env["HOZON_PASSWORD"])
    repo.load_index()
    loc = repo.index.lookup(bytes.fromhex(tree_id))
    assert loc is not None
    return loc.pack


# -- unknown fields: used as if they were not there -----------------------------------------------
def test_unknown_fields_in_a_tree_and_a_snapshot_are_ignored(backed_up: tuple[Hozon, Path], tmp_path: Path) -> None:
    hozon, _src = backed_up
    forger = Forger(hozon)
    with BlobWriter(forger.repo) as writer:
        content = writer.store(CONTENT, DATA).hex()
    root = forger.tree({"nodes": [{"name": "new.txt", "type": "file", "mode": 0o644, "size": len(CONTENT),
                                   "content": [content], "acl": {"future": True}}], "version": 9})
    snapshot_id = forger.snapshot(tree=root, labels={"from": "a newer Hozon"}, summary={"total_bytes": 1})

    hozon("restore", snapshot_id[:8], "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "new.txt").read_bytes() == CONTENT
    assert "new.txt" in hozon("ls", snapshot_id[:8]).stdout
    assert snapshot_id in hozon("snapshots", "--json").stdout
    assert "no errors were found" in hozon("check", "--read-data").stdout
    hozon("forget", "--keep-last", "1", "--prune")
    assert "no errors were found" in hozon("check").stdout


def test_a_lock_file_with_an_unknown_field_is_still_a_lock(backed_up: tuple[Hozon, Path], tmp_path: Path) -> None:
    hozon, src = backed_up
    Forger(hozon).lock(kind="exclusive", refreshed=9e9, lease={"until": "later"})  # a live lock of a newer Hozon
    for args in (("backup", str(src)), ("prune",), ("restore", "latest", "--target", str(tmp_path / "o"))):
        result = no_traceback(hozon(*args, check=False))
        assert result.returncode == 11, result.stderr
    assert "elsewhere" in no_traceback(hozon("list", "locks")).stdout


def test_a_lock_file_with_a_wrong_field_is_not_a_holder(backed_up: tuple[Hozon, Path], tmp_path: Path) -> None:
    hozon, src = backed_up
    Forger(hozon).lock(pid="one", refreshed="a while ago")
    hozon("backup", str(src))
    hozon("restore", "latest", "--target", str(tmp_path / "out"))
    assert "no locks" in hozon("list", "locks").stdout


# -- wrong fields: the file is named as damaged --------------------------------------------------
WRONG_TREES: dict[str, Any] = {
    "size-as-text": {"nodes": [{"name": "f", "type": "file", "size": "12"}]},
    "mode-as-text": {"nodes": [{"name": "d", "type": "dir", "mode": "rwxr-xr-x"}]},
    "name-as-number": {"nodes": [{"name": 42, "type": "file"}]},
    "content-not-ids": {"nodes": [{"name": "f", "type": "file", "content": ["not hex"]}]},
    "content-not-a-list": {"nodes": [{"name": "f", "type": "file", "content": "ab" * 32}]},
    "subtree-as-number": {"nodes": [{"name": "d", "type": "dir", "subtree": 7}]},
    "node-not-an-object": {"nodes": ["f"]},
    "nodes-not-a-list": {"nodes": {"f": {}}},
    "not-an-object": [],
}


@pytest.mark.parametrize("doc", WRONG_TREES.values(), ids=list(WRONG_TREES))
def test_a_tree_of_the_wrong_shape_is_named_as_damaged(backed_up: tuple[Hozon, Path], tmp_path: Path,
                                                       doc: Any) -> None:
    hozon, _src = backed_up
    forger = Forger(hozon)
    root = forger.tree(doc)
    snapshot_id = forger.snapshot(tree=root)
    pack = pack_of_tree(hozon, root)

    for args in (("restore", snapshot_id[:8], "--target", str(tmp_path / "out")), ("ls", snapshot_id[:8])):
        fails_with_one_sentence(hozon(*args, check=False), 1, pack, "not a valid tree")
    checked = no_traceback(hozon("check", check=False))
    assert checked.returncode == 1 and "does not parse" in checked.stdout, checked.stdout
    for args in (("forget", "--keep-last", "1", "--prune"), ("prune",)):
        fails_with_one_sentence(hozon(*args, check=False), 1, pack)
    assert "2 snapshot(s)" in hozon("snapshots").stdout  # listing does not read trees


WRONG_SNAPSHOTS: dict[str, dict[str, Any]] = {
    "paths-as-text": {"paths": "/etc"},
    "tree-as-number": {"tree": 5},
    "files-without-tree": {"tree": None},
    "time-as-number": {"time": 1700000000},
    "time-without-zone": {"time": "2030-01-01T00:00:00"},
    "summary-as-text": {"summary": {"total_bytes": "a lot"}},
    "tags-as-text": {"tags": "nightly"},
    "disks-not-a-list": {"kind": "vm", "tree": None, "extra": {"vm": "web1", "disks": {"name": "vda"}}},
    "disk-size-as-text": {"kind": "vm", "tree": None, "extra": {"vm": "web1", "disks": [
        {"name": "vda", "size": "8G", "chunk_size": 1048576, "maps": []}]}},
    "map-not-an-id": {"kind": "vm", "tree": None, "extra": {"vm": "web1", "disks": [
        {"name": "vda", "size": 0, "chunk_size": 1048576, "maps": ["zz"]}]}},
}


@pytest.mark.parametrize("fields", WRONG_SNAPSHOTS.values(), ids=list(WRONG_SNAPSHOTS))
def test_a_snapshot_of_the_wrong_shape_is_named_as_damaged(backed_up: tuple[Hozon, Path], tmp_path: Path,
                                                           fields: dict[str, Any]) -> None:
    hozon, _src = backed_up
    snapshot_id = Forger(hozon).snapshot(**fields)
    name = f"snapshots/{snapshot_id}"

    for args in (("restore", snapshot_id[:8], "--target", str(tmp_path / "out")), ("ls", snapshot_id[:8]),
                 ("restore", "latest", "--target", str(tmp_path / "out2")), ("forget", "--keep-last", "1"),
                 ("prune",)):
        fails_with_one_sentence(hozon(*args, check=False), 1, name, "not a valid snapshot")
    listing = no_traceback(hozon("snapshots", check=False))
    assert listing.returncode == 1 and name in listing.stderr and "1 snapshot(s)" in listing.stdout
    checked = no_traceback(hozon("check", check=False))
    assert checked.returncode == 1 and name in checked.stdout


@pytest.mark.parametrize("fields", [{"version": "1"}, {"encrypted": "yes"}, {"id": 5}, {"encrypted": False}],
                         ids=["version-as-text", "encrypted-as-text", "id-as-number", "encryption-contradicts-key"])
def test_a_config_of_the_wrong_shape_is_named_as_damaged(backed_up: tuple[Hozon, Path],
                                                         fields: dict[str, Any]) -> None:
    hozon, _src = backed_up
    Forger(hozon).config(**fields)
    for args in (("snapshots",), ("check",), ("prune",)):
        fails_with_one_sentence(hozon(*args, check=False), 1, "config")


def test_a_sealed_index_file_of_the_wrong_shape_is_named(backed_up: tuple[Hozon, Path], tmp_path: Path) -> None:
    hozon, _src = backed_up
    repo = Forger(hozon).repo
    name = repo.save_content_addressed("index", b"HZI1" + bytes(44) + b"\x01", b"index")
    fails_with_one_sentence(hozon("restore", "latest", "--target", str(tmp_path / "out"), check=False), 1,
                            f"index/{name}")
    checked = no_traceback(hozon("check", check=False))
    assert checked.returncode == 1 and f"index/{name}" in checked.stdout
