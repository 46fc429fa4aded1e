"""The image restore's reading pipeline and its checks of a snapshot's disk entries (raw, no QEMU).

End-to-end restores (qcow2 through qemu-nbd, raw files, loop devices) are in
tests/e2e/test_vm_restore.py; here: the prefetch window stays bounded (memory stays flat), a chunk
repeated nearby is fetched once, a failing fetch stops the pipeline, and a damaged or hostile
disk entry is refused before anything is written.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hozon.errors import CorruptData, HozonError
from hozon.repo.backends.local import LocalBackend
from hozon.repo.imagemap import ZERO_ID, encode_map
from hozon.repo.pack import DATA, MAP
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso
from hozon.repo.writer import BlobWriter
from hozon.restore import image
from hozon.restore.image import restore_image

CHUNK = 64 * 1024


def build(tmp_path: Path, chunks: list[bytes]) -> tuple[Repository, Snapshot, bytes]:
    """A repository holding one disk made of ``chunks`` (all-zero ones as ZERO_ID)."""
    repo = Repository.init(LocalBackend(tmp_path / "repo"), None, encrypted=False)
    repo.load_index()
    ids = np.zeros((len(chunks), 32), np.uint8)
    with BlobWriter(repo) as writer:
        for i, chunk in enumerate(chunks):
            chunk_id = ZERO_ID if not any(chunk) else writer.store_blob(chunk, DATA)
            ids[i] = np.frombuffer(chunk_id, np.uint8)
        map_id = writer.store_blob(encode_map(ids), MAP)
    disk = {"name": "vda", "size": sum(map(len, chunks)), "chunk_size": CHUNK, "maps": [map_id.hex()]}
    snapshot = Snapshot(time=now_iso(), hostname="h", paths=[], kind="vm", extra={"vm": "t", "disks": [disk]})
    repo.save_snapshot(snapshot)
    return repo, snapshot, b"".join(chunks)


def test_prefetch_stays_a_bounded_window_ahead_and_fetches_repeats_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = os.urandom(CHUNK), os.urandom(CHUNK)
    chunks = [a if i % 2 else b for i in range(40)] + [os.urandom(CHUNK) for _ in range(200)] + [bytes(CHUNK)] * 50
    repo, snapshot, content = build(tmp_path, chunks)
    [entry] = snapshot.extra["disks"]
    disk = image._Disk("vda", entry["size"], CHUNK, image._load_ids(repo, snapshot, entry), "", "raw", False)
    fetched: list[bytes] = []
    lock = threading.Lock()
    load = repo.load_blob

    def counting_load(blob_id: bytes) -> bytes:
        with lock:
            fetched.append(blob_id)
        return load(blob_id)

    monkeypatch.setattr(repo, "load_blob", counting_load)
    got = bytearray()
    lead = 0
    with ThreadPoolExecutor(4) as pool:
        for n, (offset, length, data) in enumerate(image._chunks(repo, pool, disk)):
            assert offset == n * CHUNK and length == CHUNK
            got += data if data is not None else bytes(length)
            with lock:
                lead = max(lead, len(fetched) - min(n, 240))
    assert bytes(got) == content
    assert lead <= 16  # never more than the window ahead of the writer
    assert fetched.count(repo.master.chunk_id(a)) == 1 and fetched.count(repo.master.chunk_id(b)) == 1
    assert len(fetched) == 202  # the 200 unique chunks, a and b once each, zero chunks never


def test_a_failing_fetch_stops_the_restore_and_removes_the_image(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [os.urandom(CHUNK) for _ in range(300)]
    repo, snapshot, _ = build(tmp_path, chunks)
    bad = repo.master.chunk_id(chunks[50])
    calls = 0
    load = repo.load_blob

    def failing_load(blob_id: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if blob_id == bad:
            raise CorruptData("data/xx/pack", "a chunk does not authenticate")
        return load(blob_id)

    monkeypatch.setattr(repo, "load_blob", failing_load)
    out = tmp_path / "out"
    with pytest.raises(CorruptData, match="a chunk does not authenticate"):
        restore_image(repo, snapshot, str(out), fmt="raw")
    assert calls < 50 + 1 + 16 + 2  # the map, and at most a window past the failure
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(size=-1), "invalid size or chunk size"),
        (lambda d: d.update(size=True), "invalid size or chunk size"),
        (lambda d: d.update(chunk_size=0), "invalid size or chunk size"),
        (lambda d: d.update(chunk_size=1 << 40), "invalid size or chunk size"),
        (lambda d: d.update(maps=["zz" * 32]), "malformed map ids"),
        (lambda d: d.update(maps="00" * 32), "malformed map ids"),
        (lambda d: d.pop("name"), "has no name"),
        (lambda d: d.update(size=d["size"] + 1), "maps of 4 chunks where its size needs 5"),
    ],
)
def test_damaged_disk_entries_are_corrupt_data(tmp_path: Path, change: Any, message: str) -> None:
    repo, snapshot, _ = build(tmp_path, [os.urandom(CHUNK) for _ in range(4)])
    change(snapshot.extra["disks"][0])
    with pytest.raises(CorruptData, match=message) as info:
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")
    assert info.value.path.startswith("snapshots/")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["..", "a/b", "", "x\0y"])
def test_disk_names_that_would_leave_the_target_are_refused(tmp_path: Path, name: str) -> None:
    repo, snapshot, _ = build(tmp_path, [os.urandom(CHUNK)])
    snapshot.extra["disks"][0]["name"] = name
    with pytest.raises(HozonError, match="outside the target"):
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")


def test_a_disk_listed_twice_is_refused(tmp_path: Path) -> None:
    repo, snapshot, _ = build(tmp_path, [os.urandom(CHUNK)])
    snapshot.extra["disks"].append(dict(snapshot.extra["disks"][0]))
    with pytest.raises(CorruptData, match="'vda' is listed twice"):
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")


def test_an_empty_disk_and_progress(tmp_path: Path) -> None:
    repo, snapshot, content = build(tmp_path, [os.urandom(CHUNK), bytes(CHUNK), os.urandom(100)])
    empty = {"name": "vdb", "size": 0, "chunk_size": CHUNK, "maps": []}
    snapshot.extra["disks"].append(empty)
    calls: list[tuple[int, int]] = []
    result = restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw", progress=lambda d, t: calls.append((d, t)))
    assert (tmp_path / "out" / "vda.raw").read_bytes() == content
    assert (tmp_path / "out" / "vdb.raw").read_bytes() == b""
    assert [(r.name, r.bytes_written, r.zero_bytes) for r in result] == [("vda", CHUNK + 100, CHUNK), ("vdb", 0, 0)]
    assert calls[-1] == (len(content), len(content))
