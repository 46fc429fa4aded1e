"""hozon dump (a file to stdout, a directory as tar) and hozon stats, through the real command."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Hozon

MiB = 1024 * 1024


def make_source(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"hello, hozon\n")
    (root / "sub" / "big.bin").write_bytes(os.urandom(3 * MiB + 7))
    (root / "sub" / "text.log").write_bytes(b"the same line again and again\n" * 100_000)
    os.link(root / "small.txt", root / "sub" / "hard.txt")
    os.symlink("small.txt", root / "link")
    with open(root / "sparse", "wb") as f:
        f.truncate(40 * MiB)
        f.seek(20 * MiB)
        f.write(b"data in the middle")
    try:
        os.setxattr(root / "small.txt", "user.colour", b"blue\xff")
    except OSError as exc:  # tmpfs before Linux 6.6 has no user.* attributes (a chroot's /tmp often is one)
        if exc.errno != errno.EOPNOTSUPP:
            raise


def digest(root: Path) -> dict[str, tuple[int, bytes]]:
    """Each entry below root: its mode and its content (a link's target)."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, os.readlink(p).encode() if p.is_symlink()
                                       else p.read_bytes() if p.is_file() else b"")
            for p in root.rglob("*")}


def dump_bytes(hozon: Hozon, *args: str) -> bytes:
    proc = subprocess.run([sys.executable, "-m", "hozon", "dump", *args], env=hozon.env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def test_dump_writes_a_file_as_it_was_and_a_directory_as_tar(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    hozon("backup", str(src))

    assert dump_bytes(hozon, "latest", f"{src}/sub/big.bin") == (src / "sub" / "big.bin").read_bytes()
    assert dump_bytes(hozon, "latest", f"{src}/sparse") == (src / "sparse").read_bytes()

    archive = dump_bytes(hozon, "latest", str(src))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["src/sub/hard.txt"].islnk() and members["src/sub/hard.txt"].linkname == "src/small.txt"
        assert members["src/link"].issym() and members["src/link"].linkname == "small.txt"
        if os.listxattr(src / "small.txt"):  # the source could hold one (see make_source)
            assert members["src/small.txt"].pax_headers["SCHILY.xattr.user.colour"].encode(
                "utf-8", "surrogateescape") == b"blue\xff"
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True, timeout=120)  # as a user would
    assert digest(out / "src") == digest(src)

    whole = dump_bytes(hozon, "latest", "/")  # the whole snapshot, names below /
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        assert f"{str(src).lstrip('/')}/sub/big.bin" in tar.getnames()


def test_dump_to_a_target_file_never_replaces_one_and_says_what_is_missing(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    hozon("backup", str(src))
    target = tmp_path / "small.copy"
    hozon("dump", "latest", f"{src}/small.txt", "--target", str(target))
    assert target.read_bytes() == b"hello, hozon\n"

    again = hozon("dump", "latest", f"{src}/small.txt", "--target", str(target), check=False)
    assert again.returncode == 2 and "cannot create" in again.stderr and "Traceback" not in again.stderr

    missing = hozon("dump", "latest", f"{src}/nothing-here", "--target", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1 and "is not in snapshot" in missing.stderr
    assert not (tmp_path / "x").exists()

    link = hozon("dump", "latest", f"{src}/link", check=False)
    assert link.returncode == 1 and "is a symlink" in link.stderr


def test_a_dump_that_meets_a_missing_pack_fails_and_leaves_no_file(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    hozon("backup", str(src))
    for pack in (hozon.repo / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    target = tmp_path / "big.copy"
    run = hozon("dump", "latest", f"{src}/sub/big.bin", "--target", str(target), check=False)
    assert run.returncode == 1 and "damaged" in run.stderr and "Traceback" not in run.stderr
    assert not target.exists()


def test_stats_counts_restore_size_per_snapshot_and_stored_data_once(hozon: Hozon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_source(src)
    hozon("backup", str(src))
    hozon("backup", str(src), "--tag", "again")  # the same data: restore size doubles, stored data does not

    file_sizes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()
                     and p.name != "hard.txt")  # one hard-linked file counts once
    restore = json.loads(hozon("stats", "--json").stdout)
    assert restore["snapshots"] == 2 and restore["files"] == 2 * 4
    assert restore["restore_size"] == 2 * file_sizes
    assert "stored_size" not in restore

    raw = json.loads(hozon("stats", "--mode", "raw-data", "--json").stdout)
    one = json.loads(hozon("stats", "latest", "--mode", "raw-data", "--json").stdout)
    # The same files: no data blob is added. Only the trees of the directories above the source may
    # differ (their mtimes move as the test writes beside them), each a few hundred bytes.
    assert raw["blobs"]["data"] == one["blobs"]["data"]
    assert 0 <= raw["raw_size"] - one["raw_size"] < 4096
    assert raw["dedup_ratio"] > 1.9 * one["dedup_ratio"] > 0
    packs = sum(p.stat().st_size for p in (hozon.repo / "data").rglob("*") if p.is_file())
    assert 0 < raw["stored_size"] < packs
    assert raw["compression_ratio"] > 1.5  # the repetitive log compresses
    assert raw["blobs"]["data"] >= 4 and raw["blobs"]["tree"] >= 2

    text = hozon("stats", "--mode", "raw-data").stdout
    assert "deduplication ratio" in text and "compression ratio" in text

    bad = hozon("stats", "--mode", "bogus", check=False)
    assert bad.returncode == 2 and "unknown mode" in bad.stderr


def test_stats_of_an_image_snapshot_counts_the_disk_and_its_chunks(hozon: Hozon, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:  # 16 MiB virtual, 2 MiB of data: zero chunks are stored nowhere
        f.truncate(16 * MiB)
        f.write(os.urandom(2 * MiB))
    hozon("vm", "backup", "--image", str(image), "--name", "offline")
    restore = json.loads(hozon("stats", "--json").stdout)
    assert restore["disks"] == 1 and restore["files"] == 0 and restore["restore_size"] == 16 * MiB
    raw = json.loads(hozon("stats", "--mode", "raw-data", "--json").stdout)
    assert raw["blobs"]["map"] == 1 and raw["blobs"]["data"] == 2  # two 1 MiB chunks of random data
    assert raw["raw_size"] == 2 * MiB + 16 * 32  # the chunks and the map of 16 ids
