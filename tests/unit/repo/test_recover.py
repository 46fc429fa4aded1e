"""Packs a killed backup stored but never indexed are taken back by the next backup, when that is safe."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hozon.repo.backends.local import LocalBackend
from hozon.repo.locks import STALE_AFTER
from hozon.repo.pack import DATA
from hozon.repo.recover import adopt_orphan_packs
from hozon.repo.repository import Repository
from hozon.repo.writer import BlobWriter


def _open(path: Path) -> Repository:
    repo = Repository.open(LocalBackend(path), None)
    repo.load_index()
    return repo


def _repository_with_an_orphan_pack(path: Path) -> tuple[list[bytes], list[bytes]]:
    """Store a few blobs, then drop the index files: what a backup killed before its index leaves."""
    repo = Repository.init(LocalBackend(path), None, encrypted=False)
    repo.load_index()
    blobs = [os.urandom(1000 + i) for i in range(20)]
    with BlobWriter(repo) as writer:
        ids = [writer.store(blob, DATA) for blob in blobs]
    for key, _size in list(repo.backend.list("index")):
        repo.backend.delete(key)
    return blobs, ids


def _foreign_lock(repo: Repository, refreshed: float) -> None:
    doc = {"kind": "shared", "hostname": "another-host", "pid": 4242, "command": "backup", "started": refreshed,
           "refreshed": refreshed}
    repo.backend.put(f"locks/{os.urandom(16).hex()}", repo.seal(json.dumps(doc).encode(), b"lock"))


def test_orphan_packs_are_indexed_and_serve_deduplication(tmp_path: Path) -> None:
    blobs, ids = _repository_with_an_orphan_pack(tmp_path)
    repo = _open(tmp_path)
    assert not any(repo.index.has_live(i) for i in ids)

    assert adopt_orphan_packs(repo) == 1
    assert all(repo.index.has_live(i) for i in ids)
    assert repo.load_blob(ids[7]) == blobs[7]

    again = _open(tmp_path)  # the adoption was written to an index file, not only kept in memory
    assert all(again.index.has_live(i) for i in ids)
    assert adopt_orphan_packs(again) == 0


def test_nothing_is_adopted_while_another_process_holds_the_repository(tmp_path: Path) -> None:
    _blobs, ids = _repository_with_an_orphan_pack(tmp_path)
    repo = _open(tmp_path)
    _foreign_lock(repo, refreshed=time.time())  # a live backup elsewhere: its packs may be in flight
    assert adopt_orphan_packs(repo) == 0
    assert not any(repo.index.has_live(i) for i in ids)


def test_a_stale_lock_does_not_prevent_adoption(tmp_path: Path) -> None:
    _blobs, ids = _repository_with_an_orphan_pack(tmp_path)
    repo = _open(tmp_path)
    _foreign_lock(repo, refreshed=time.time() - STALE_AFTER - 60)
    assert adopt_orphan_packs(repo) == 1
    assert all(repo.index.has_live(i) for i in ids)
