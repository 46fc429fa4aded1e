"""Restoring VM image snapshots (hozon.restore.image) to qcow2 and raw images, files and a loop device.

The snapshots are built with the Python API, as a VM backup stores them (no VM needed): 1 MiB
chunks of a synthetic disk — random, repeated, zero (ZERO_ID, stored nowhere), and a partial last
chunk — as data blobs, their ids in map blobs, and a ``vm`` snapshot naming them. What a restore
wrote is checked with QEMU's own tools (``qemu-img convert``/``map``) and the file system
(holes), as a user would check it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hozon.errors import CorruptData, HozonError, UsageError
from hozon.repo.backends.local import LocalBackend
from hozon.repo.imagemap import ZERO_ID, encode_map, split_maps
from hozon.repo.pack import DATA, MAP, pack_key
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso, this_host
from hozon.repo.writer import BlobWriter
from hozon.restore.image import DiskRestore, restore_image

MiB = 1 << 20
CHUNK = MiB
PASSWORD = "pw"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
        reason="needs qemu-img and qemu-nbd (Debian package qemu-utils); CI installs them",
    ),
]


# -- building image snapshots --------------------------------------------------------------------


def synthetic_disk(chunks: int, tail: int, seed: int) -> bytes:
    """``chunks`` whole chunks and a ``tail``-byte last one: random, repeated and zero chunks."""
    rng = np.random.default_rng(seed)
    repeated = rng.bytes(CHUNK)
    parts = []
    for i in range(chunks):
        if i % 5 in (0, 3):
            parts.append(bytes(CHUNK))  # zero
        elif i % 5 == 1:
            parts.append(repeated)  # the same chunk, stored once
        else:
            parts.append(rng.bytes(CHUNK))
    if tail:
        parts.append(rng.bytes(tail))
    return b"".join(parts)


def store_disk(writer: BlobWriter, name: str, content: bytes, chunk_size: int = CHUNK) -> dict[str, Any]:
    """Store ``content`` as a VM backup does; the disk's entry for ``extra["disks"]``."""
    ids = np.zeros((-(-len(content) // chunk_size), 32), np.uint8)
    for i in range(len(ids)):
        chunk = content[i * chunk_size : (i + 1) * chunk_size]
        chunk_id = ZERO_ID if not any(chunk) else writer.store_blob(chunk, DATA)
        ids[i] = np.frombuffer(chunk_id, np.uint8)
    maps = [writer.store_blob(encode_map(part), MAP).hex() for part in split_maps(ids)]
    return {"name": name, "size": len(content), "chunk_size": chunk_size, "maps": maps, "format": "qcow2"}


@dataclass
class ImageRepo:
    repo: Repository
    path: Path
    snapshot: Snapshot
    disks: dict[str, bytes]


def make_snapshot(repo: Repository, disks: dict[str, bytes], **extra: Any) -> Snapshot:
    with BlobWriter(repo) as writer:
        entries = [store_disk(writer, name, content) for name, content in disks.items()]
    snapshot = Snapshot(time=now_iso(), hostname=this_host(), paths=[], kind="vm", tree=None,
                        extra={"vm": "test", "disks": entries, "domain_xml": "<domain/>", **extra})
    repo.save_snapshot(snapshot)
    return snapshot


@pytest.fixture
def image_repo(tmp_path: Path) -> ImageRepo:
    """A repository with one snapshot of VM "test": vda (20.5 MiB, mixed) and vdb (3 MiB, mostly zero)."""
    path = tmp_path / "repo"
    repo = Repository.init(LocalBackend(path), PASSWORD)
    repo.load_index()
    vdb = bytearray(3 * MiB)
    vdb[MiB + 4096 : MiB + 8192] = b"\x5a" * 4096
    disks = {"vda": synthetic_disk(20, 512 * 1024, seed=1), "vdb": bytes(vdb)}
    snapshot = make_snapshot(repo, disks)
    reopened = Repository.open(LocalBackend(path), PASSWORD)  # as a restore would: from disk
    reopened.load_index()
    return ImageRepo(reopened, path, reopened.load_snapshot(snapshot.id), disks)


# -- checking what was written -------------------------------------------------------------------


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


def qcow2_bytes(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{image.name}.converted"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def data_ranges(image: Path) -> list[tuple[int, int]]:
    """The (start, end) ranges ``qemu-img map`` reports as holding data."""
    runs = json.loads(run("qemu-img", "map", "--output=json", str(image)).stdout)
    return [(r["start"], r["start"] + r["length"]) for r in runs if r["data"]]


def zero_chunks(content: bytes) -> list[int]:
    return [i for i in range(0, len(content), CHUNK) if not any(content[i : i + CHUNK])]


def file_data_ranges(path: Path) -> list[tuple[int, int]]:
    """Where a file has data, by SEEK_DATA / SEEK_HOLE (holes are what a sparse restore leaves)."""
    ranges = []
    with open(path, "rb") as f:
        fd, pos, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos))
    return ranges


def overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(lo < end and start < hi for lo, hi in ranges)


# -- restoring to a directory --------------------------------------------------------------------


def test_restore_to_a_directory_as_thin_qcow2(image_repo: ImageRepo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls: list[tuple[int, int]] = []
    result = restore_image(image_repo.repo, image_repo.snapshot, str(out), progress=lambda d, t: calls.append((d, t)))

    snap = image_repo.snapshot
    assert sorted(os.listdir(out)) == sorted(["vda.qcow2", "vdb.qcow2", f"{snap.short_id}.json", "domain.xml"])
    assert [r.name for r in result] == ["vda", "vdb"]
    for r in result:
        content = image_repo.disks[r.name]
        zero = CHUNK * len(zero_chunks(content))  # (no disk here ends in a partial zero chunk)
        assert r == DiskRestore(r.name, str(out / f"{r.name}.qcow2"), "qcow2", len(content), len(content) - zero, zero)
        image = Path(r.path)
        info = json.loads(run("qemu-img", "info", "--output=json", str(image)).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == len(content)
        assert qcow2_bytes(image, tmp_path) == content
        ranges = data_ranges(image)
        for offset in zero_chunks(content):
            assert not overlaps(ranges, offset, offset + CHUNK), (r.name, offset, ranges)
        assert os.stat(image).st_mode & 0o077 == 0  # a disk image is nobody else's business

    total = sum(len(c) for c in image_repo.disks.values())
    assert calls and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))
    listing = json.loads((out / f"{snap.short_id}.json").read_text())
    assert listing["id"] == snap.id and listing["kind"] == "vm" and listing["extra"]["vm"] == "test"
    assert (out / "domain.xml").read_text() == "<domain/>"


def test_restore_to_a_directory_as_sparse_raw(image_repo: ImageRepo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = restore_image(image_repo.repo, image_repo.snapshot, str(out), fmt="raw")
    assert sorted(os.listdir(out)) == sorted(["vda.raw", "vdb.raw", f"{image_repo.snapshot.short_id}.json",
                                              "domain.xml"])
    assert all(name.endswith((".raw", ".json", ".xml")) for name in os.listdir(out))
    for r in result:
        content = image_repo.disks[r.name]
        path = Path(r.path)
        assert r.format == "raw"
        assert path.read_bytes() == content
        ranges = file_data_ranges(path)
        for offset in zero_chunks(content):
            assert not overlaps(ranges, offset, offset + CHUNK), (r.name, offset, ranges)
        assert os.stat(path).st_blocks * 512 <= r.bytes_written + 64 * 1024


def test_a_second_restore_into_the_same_directory_refuses(image_repo: ImageRepo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    restore_image(image_repo.repo, image_repo.snapshot, str(out))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(HozonError, match=r"vda\.qcow2 exists; remove it or choose another --to"):
        restore_image(image_repo.repo, image_repo.snapshot, str(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched, nothing left


def test_one_disk_into_a_directory_that_holds_another(image_repo: ImageRepo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an existing directory: the named disk goes in as <name>.qcow2 (a new path would be a file)
    restore_image(image_repo.repo, image_repo.snapshot, str(out), disk="vdb")
    restore_image(image_repo.repo, image_repo.snapshot, str(out), disk="vda")  # same metadata: fine
    assert sorted(os.listdir(out)) == sorted(["vda.qcow2", "vdb.qcow2", f"{image_repo.snapshot.short_id}.json",
                                              "domain.xml"])
    (out / "domain.xml").write_text("<domain>edited</domain>")
    (out / "vdb.qcow2").unlink()
    with pytest.raises(HozonError, match=r"domain\.xml exists with other content"):
        restore_image(image_repo.repo, image_repo.snapshot, str(out), disk="vdb")
    assert not (out / "vdb.qcow2").exists()


# -- restoring one disk to a file or a device ----------------------------------------------------


def test_one_disk_to_a_file(image_repo: ImageRepo, tmp_path: Path) -> None:
    content = image_repo.disks["vda"]
    target = tmp_path / "images" / "vda.img"  # the parent is created
    [r] = restore_image(image_repo.repo, image_repo.snapshot, str(target), disk="vda")
    assert (r.path, r.format, r.size) == (str(target), "raw", len(content))
    assert target.read_bytes() == content
    assert not overlaps(file_data_ranges(target), 0, CHUNK)  # chunk 0 is zero: a hole
    assert sorted(os.listdir(target.parent)) == ["vda.img"]  # no metadata beside a single file

    as_qcow2 = tmp_path / "vda.qcow2"
    [q] = restore_image(image_repo.repo, image_repo.snapshot, str(as_qcow2), disk="vda")
    assert q.format == "qcow2"
    assert qcow2_bytes(as_qcow2, tmp_path) == content

    with pytest.raises(HozonError, match="exists; remove it or choose another --to"):
        restore_image(image_repo.repo, image_repo.snapshot, str(target), disk="vda")
    assert target.read_bytes() == content


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    attached = run("losetup", "-f", "--show", str(backing), check=False)
    if attached.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {attached.stderr.strip() or attached.returncode}")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        run("losetup", "-d", device, check=False)


def test_one_disk_onto_a_block_device_overwrites_old_data(image_repo: ImageRepo, tmp_path: Path) -> None:
    content = image_repo.disks["vda"]
    backing = tmp_path / "device.img"
    old = b"\xee" * (len(content) + 2 * MiB)  # stale data everywhere, and room to spare
    backing.write_bytes(old)
    with loop_device(backing) as device:
        [r] = restore_image(image_repo.repo, image_repo.snapshot, device, disk="vda")
        assert (r.path, r.format) == (device, "raw")
        with open(device, "rb") as f:
            written = f.read(len(old))
    assert written[: len(content)] == content  # zero chunks were written as zeroes
    assert written[len(content) :] == old[len(content) :]  # past the disk: untouched
    assert r.zero_bytes == CHUNK * len(zero_chunks(content))


def test_a_block_device_too_small_is_refused(image_repo: ImageRepo, tmp_path: Path) -> None:
    backing = tmp_path / "small.img"
    backing.write_bytes(b"\xee" * (4 * MiB))
    with loop_device(backing) as device:
        with pytest.raises(HozonError, match=r"holds 4194304 bytes; disk vda needs"):
            restore_image(image_repo.repo, image_repo.snapshot, device, disk="vda")
        with pytest.raises(UsageError, match="written raw"):
            restore_image(image_repo.repo, image_repo.snapshot, device, disk="vdb", fmt="qcow2")
    assert backing.read_bytes() == b"\xee" * (4 * MiB)


# -- damage and refusals -------------------------------------------------------------------------


def test_a_damaged_chunk_is_corrupt_data_naming_its_pack(image_repo: ImageRepo, tmp_path: Path) -> None:
    content = image_repo.disks["vda"]
    chunk = content[7 * CHUNK : 8 * CHUNK]  # a random chunk
    loc = image_repo.repo.index.lookup(image_repo.repo.master.chunk_id(chunk))
    assert loc is not None
    pack = image_repo.path / pack_key(loc.pack)
    damaged = bytearray(pack.read_bytes())
    damaged[loc.offset + loc.length // 2] ^= 0x01
    pack.write_bytes(bytes(damaged))
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out-{fmt}"
        with pytest.raises(CorruptData) as info:
            restore_image(image_repo.repo, image_repo.snapshot, str(out), fmt=fmt)
        assert info.value.path == pack_key(loc.pack)
        assert loc.pack in str(info.value) and "does not authenticate" in str(info.value)
        assert not out.exists()  # the unfinished restore removed what it made


def test_a_chunk_of_the_wrong_length_is_corrupt_data(tmp_path: Path) -> None:
    repo = Repository.init(LocalBackend(tmp_path / "repo"), PASSWORD)
    repo.load_index()
    short = os.urandom(1000)
    with BlobWriter(repo) as writer:
        good = store_disk(writer, "vda", os.urandom(2 * CHUNK))
        ids = np.zeros((2, 32), np.uint8)
        ids[0] = np.frombuffer(writer.store_blob(short, DATA), np.uint8)  # chunk 0 names a 1000-byte blob
        ids[1] = np.frombuffer(writer.store_blob(os.urandom(CHUNK), DATA), np.uint8)
        good["maps"] = [writer.store_blob(encode_map(ids), MAP).hex()]
    short_id = repo.master.chunk_id(short)
    snapshot = Snapshot(time=now_iso(), hostname="h", paths=[], kind="vm", extra={"vm": "t", "disks": [good]})
    repo.save_snapshot(snapshot)
    loc = repo.index.lookup(short_id)
    assert loc is not None
    with pytest.raises(CorruptData, match=r"holds 1000 bytes where chunk 0 of disk 'vda' has 1048576") as info:
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")
    assert info.value.path == pack_key(loc.pack)

    good["size"] = 5 * CHUNK  # the map no longer covers the disk
    with pytest.raises(CorruptData, match="maps of 2 chunks where its size needs 5"):
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")
    good["name"] = "../escape"
    with pytest.raises(HozonError, match="outside the target"):
        restore_image(repo, snapshot, str(tmp_path / "out"), fmt="raw")
    assert not (tmp_path / "out").exists()


def test_wrong_requests_are_usage_errors(image_repo: ImageRepo, tmp_path: Path) -> None:
    repo, snap = image_repo.repo, image_repo.snapshot
    with pytest.raises(UsageError, match=r"has no disk 'sda'; it has: vda, vdb"):
        restore_image(repo, snap, str(tmp_path / "x"), disk="sda")
    with pytest.raises(UsageError, match="unknown image format 'vmdk'"):
        restore_image(repo, snap, str(tmp_path / "x"), fmt="vmdk")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"keep")
    with pytest.raises(UsageError, match="is not a directory"):
        restore_image(repo, snap, str(a_file))
    with pytest.raises(UsageError, match="is not a directory, a block device or a new file"):
        restore_image(repo, snap, "/dev/null", disk="vda")
    with pytest.raises(UsageError, match="is not a block device"):
        restore_image(repo, snap, "/dev/hozon-no-such-device", disk="vda")
    files = Snapshot(time=now_iso(), hostname="h", paths=["/x"], kind="files", tree="00" * 32)
    with pytest.raises(HozonError, match="files snapshot with no disk images"):
        restore_image(repo, files, str(tmp_path / "x"))
    assert a_file.read_bytes() == b"keep" and not (tmp_path / "x").exists()


def test_missing_qemu_tools_name_the_package(image_repo: ImageRepo, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HozonError) as info:
        restore_image(image_repo.repo, image_repo.snapshot, str(tmp_path / "out"))
    assert "qemu-img and qemu-nbd" in info.value.message and info.value.hint and "qemu-utils" in info.value.hint
    assert not (tmp_path / "out").exists()
    restore_image(image_repo.repo, image_repo.snapshot, str(tmp_path / "out"), fmt="raw")  # raw needs neither


@contextlib.contextmanager
def small_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path), check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        run("umount", str(path), check=False)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_full_target_disk_is_one_clear_sentence(image_repo: ImageRepo, tmp_path: Path, fmt: str) -> None:
    with small_tmpfs(tmp_path / "small", "size=6m") as small:
        out = small / "out"
        with pytest.raises(HozonError) as info:
            restore_image(image_repo.repo, image_repo.snapshot, str(out), fmt=fmt)
        assert not isinstance(info.value, CorruptData)
        assert info.value.message == f"no space left on the disk holding {out}/vda.{fmt} while restoring disk vda"
        assert not out.exists()  # the unfinished image and the directory were removed


def test_a_read_only_target_is_one_clear_sentence(image_repo: ImageRepo, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        with pytest.raises(HozonError, match=r"^cannot create the directory .*/out: Read-only file system$"):
            restore_image(image_repo.repo, image_repo.snapshot, str(ro / "out"))
        with pytest.raises(HozonError, match=r"^cannot write .*/vda\.img: Read-only file system$"):
            restore_image(image_repo.repo, image_repo.snapshot, str(ro / "vda.img"), disk="vda")
