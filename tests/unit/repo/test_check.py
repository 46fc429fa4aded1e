"""hozon.repo.check on small hand-built repositories: what is found, and which paths it is blamed on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hozon.repo import pack as pack_module
from hozon.repo.backends.local import LocalBackend
from hozon.repo.check import CheckResult, check_repository
from hozon.repo.imagemap import ZERO_ID, encode_map
from hozon.repo.index import IndexFile
from hozon.repo.pack import DATA, MAP, TREE, pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso
from hozon.repo.tree import DIR, FILE, Node, encode_tree
from hozon.repo.writer import BlobWriter


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(LocalBackend(tmp_path / "repo"), None, encrypted=False)


def reopen(repo: Repository) -> Repository:
    return Repository.open(repo.backend, None)


def check(repo: Repository, read_data: bool = False) -> CheckResult:
    return check_repository(reopen(repo), read_data=read_data)


def store_file(w: BlobWriter, name: str, *chunks: bytes, extra_ids: tuple[str, ...] = ()) -> Node:
    ids = [w.store(c, DATA).hex() for c in chunks]
    return Node(name, FILE, size=sum(map(len, chunks)), content=[*ids, *extra_ids])


def store_dir(w: BlobWriter, name: str, nodes: list[Node]) -> Node:
    return Node(name, DIR, subtree=w.store(encode_tree(nodes), TREE).hex())


def save_snapshot(repo: Repository, root: list[Node] | None, **extra: object) -> Snapshot:
    with BlobWriter(repo) as w:
        tree = w.store(encode_tree(root), TREE).hex() if root is not None else None
    snap = Snapshot(time=now_iso(), hostname="h", paths=["/"], kind="files" if root is not None else "vm",
                    tree=tree, extra=dict(extra))
    repo.save_snapshot(snap)
    return snap


def flip_byte_of_blob(repo: Repository, blob_id: str) -> str:
    """Flip one byte in the middle of a stored blob; returns the pack's name."""
    r = reopen(repo)
    r.load_index()
    loc = r.index.lookup(bytes.fromhex(blob_id))
    assert loc is not None
    path = Path(r.backend.location) / pack_key(loc.pack)
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return loc.pack


def affected_paths(result: CheckResult) -> dict[str, list[str]]:
    return {a.snapshot: list(a.paths) for a in result.affected}


def test_a_clean_repository_passes_both_checks(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        docs = store_dir(w, "docs", [store_file(w, "a.txt", b"alpha" * 1000), store_file(w, "b.txt", b"beta")])
    save_snapshot(repo, [docs, Node("empty", FILE)])
    for read_data in (False, True):
        result = check(repo, read_data)
        assert result.ok, result.errors
        assert not result.notes and not result.affected
    assert check(repo, True).packs_read == 2


def test_an_empty_repository_passes(repo: Repository) -> None:
    assert check(repo, read_data=True).ok


def test_a_blob_in_no_index_names_every_snapshot_and_path_that_uses_it(repo: Repository) -> None:
    ghost = os.urandom(32).hex()
    with BlobWriter(repo) as w:
        shared = store_dir(w, "shared", [store_file(w, "bad.bin", b"ok part", extra_ids=(ghost,)),
                                         store_file(w, "good.bin", b"fine")])
    first = save_snapshot(repo, [shared])
    second = save_snapshot(repo, [shared, Node("other", FILE)])  # the same subtree, checked once, blamed twice
    result = check(repo)
    assert not result.ok
    assert affected_paths(result) == {first.id: ["/shared/bad.bin"], second.id: ["/shared/bad.bin"]}
    assert any(first.short_id in e and "/shared/bad.bin" in e and "no index" in e for e in result.errors)
    assert any(second.short_id in e for e in result.errors)


def test_a_missing_pack_is_named_with_its_index_file_and_what_it_costs(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        node = store_file(w, "f.bin", os.urandom(5000))
    snap = save_snapshot(repo, [node])  # the root tree goes into a second pack
    r = reopen(repo)
    r.load_index()
    loc = r.index.lookup(bytes.fromhex(node.content[0]))
    assert loc is not None
    os.unlink(Path(r.backend.location) / pack_key(loc.pack))
    for read_data in (False, True):
        result = check(repo, read_data)
        assert result.missing_packs == (loc.pack,)
        (error,) = result.errors
        assert loc.pack in error and "missing" in error and "index/" in error
        assert f"snapshot {snap.short_id}: /f.bin" in error
        assert affected_paths(result) == {snap.id: ["/f.bin"]}


def test_a_damaged_tree_blob_costs_its_whole_directory(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        inner = store_dir(w, "inner", [store_file(w, "x", b"x" * 100)])
        outer = store_dir(w, "outer", [inner, store_file(w, "y", b"y" * 100)])
    snap = save_snapshot(repo, [outer])
    assert inner.subtree is not None
    damaged = flip_byte_of_blob(repo, inner.subtree)
    result = check(repo)  # trees are read even without --read-data
    assert result.damaged_packs == (damaged,)
    assert affected_paths(result) == {snap.id: ["/outer/inner"]}
    assert "tree blob" in result.errors[0] and "does not authenticate" in result.errors[0]


def test_read_data_finds_a_flipped_data_blob_among_many_packs(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack_module, "TARGET_PACK_SIZE", 4096)  # many small packs, read on two threads
    with BlobWriter(repo) as w:
        files = [store_file(w, f"f{i:03}", os.urandom(3000)) for i in range(60)]
    snap = save_snapshot(repo, files)
    damaged = flip_byte_of_blob(repo, files[17].content[0])
    assert check(repo).ok  # the structure is fine: data blobs are not read
    result = check(repo, read_data=True)
    assert result.damaged_packs == (damaged,)
    assert result.packs_read == len(list(repo.list_packs()))
    (error,) = result.errors
    assert damaged in error and "data blob" in error and f"snapshot {snap.short_id}: /f017" in error
    assert affected_paths(result) == {snap.id: ["/f017"]}


def test_read_data_notices_an_index_that_disagrees_with_the_pack_header(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        a, b = store_file(w, "a", os.urandom(1000)), store_file(w, "b", os.urandom(1000))
    snap = save_snapshot(repo, [a, b])
    r = reopen(repo)
    for key, _size in r.backend.list("index"):
        index_file = r.decode_index_file(key.rsplit("/", 1)[-1])
        rows = [i for i, e in enumerate(index_file.entries) if bytes(e["id"]).hex() == b.content[0]]
        if rows:
            break
    entries = index_file.entries.copy()
    entries[rows[0]]["offset"] += 1
    r.backend.delete(key)
    r.save_content_addressed("index", _encode(IndexFile(index_file.names, index_file.condemned_at,
                                                          index_file.counts, entries)), b"index")
    result = check(repo, read_data=True)
    assert any("disagree" in e for e in result.errors)
    assert affected_paths(result) == {snap.id: ["/b"]}


def _encode(f: IndexFile) -> bytes:
    from hozon.repo.index import encode_index

    return encode_index(f.records())


def test_condemned_packs_are_still_valid_locations(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        node = store_file(w, "f", b"data" * 100)
    save_snapshot(repo, [node])
    r = reopen(repo)
    for key, _size in list(r.backend.list("index")):
        f = r.decode_index_file(key.rsplit("/", 1)[-1])
        r.backend.delete(key)
        r.save_content_addressed("index", _encode(IndexFile(f.names, [1] * len(f.names), f.counts, f.entries)),
                                 b"index")
    assert check(repo, read_data=True).ok


def test_unreferenced_packs_are_a_note_not_an_error(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        node = store_file(w, "f", b"data" * 100)
    save_snapshot(repo, [node])
    repo.backend.put(pack_key("ee" * 32), b"garbage from a killed backup")
    result = check(repo, read_data=True)
    assert result.ok
    assert result.notes == ("1 unreferenced pack(s), left by an interrupted backup; `hozon prune` removes them",)


def image_snapshot(repo: Repository, chunk_ids: list[bytes]) -> Snapshot:
    """A VM snapshot whose one disk's map names ``chunk_ids`` (ZERO_ID for zero chunks)."""
    ids = np.frombuffer(b"".join(chunk_ids), np.uint8).reshape(-1, 32)
    with BlobWriter(repo) as w:
        map_id = w.store(encode_map(ids), MAP).hex()
    disk = {"name": "vda", "size": len(chunk_ids) << 20, "chunk_size": 1 << 20, "maps": [map_id]}
    return save_snapshot(repo, None, vm="web", disks=[disk])


def test_image_snapshots_are_checked_through_their_disk_maps(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        stored = w.store(b"disk block" * 100, DATA)
    good = image_snapshot(repo, [stored, ZERO_ID, stored])
    bad = image_snapshot(repo, [stored, os.urandom(32)])
    result = check(repo, read_data=True)
    assert set(affected_paths(result)) == {bad.id}
    assert good.id not in affected_paths(result)
    assert affected_paths(result)[bad.id] == ["disk vda"]


def test_a_very_deep_tree_is_walked_without_recursion(repo: Repository) -> None:
    depth = 1500
    ghost = os.urandom(32).hex()
    with BlobWriter(repo) as w:
        node = Node("leaf", FILE, content=[ghost])
        for level in range(depth):
            node = store_dir(w, f"d{level}", [node])
    snap = save_snapshot(repo, [node])
    result = check(repo)
    (paths,) = affected_paths(result).values()
    assert paths[0].endswith("/d1/d0/leaf") and paths[0].count("/") == depth + 1
    assert snap.short_id in result.errors[0]


def test_a_damaged_index_file_is_named_and_its_packs_are_counted_unreferenced(repo: Repository) -> None:
    with BlobWriter(repo) as w:
        node = store_file(w, "f", b"data" * 100)
    snap = save_snapshot(repo, [node])
    r = reopen(repo)
    key = sorted(r.backend.list("index"))[0].key
    path = Path(r.backend.location) / key
    path.write_bytes(path.read_bytes()[:-3])
    result = check(repo)
    assert any(key in e for e in result.errors)
    assert snap.id in affected_paths(result)
    assert "damaged index file" in result.notes[0]

