"""Hozon's NBD client writing to real qemu-nbd: what lands in the qcow2 is checked by QEMU's tools.

Each test serves a qcow2 with ``qemu-nbd`` (writable), writes through :class:`NbdClient`, stops
the server, and then asks ``qemu-io`` (patterns), ``qemu-img compare`` / ``convert`` (every byte)
and ``qemu-img map`` (what is allocated) — so the expectations come from QEMU, not from Hozon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hozon.errors import HozonError
from hozon.nbd import NbdClient, NbdError, NbdRequestError
from hozon.nbd.qemu_nbd import QemuNbd

KiB = 1024
MiB = 1024 * KiB

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
        reason="needs qemu-nbd, qemu-img and qemu-io (Debian package qemu-utils); CI installs them",
    ),
]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hozon-nbdw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(image: Path, sock: Path, *extra: str) -> Iterator[str]:
    """``qemu-nbd`` serving ``image`` writable on ``sock``; stopped (and the image closed) on exit."""
    args = ["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--persistent", "--shared=1", *extra, str(image)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd exited with {proc.returncode}: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd made no socket within 20 s")
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qcow2(path: Path, size: int, *qemu_io_writes: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    if qemu_io_writes:
        run("qemu-io", "-f", "qcow2", *[a for w in qemu_io_writes for a in ("-c", w)], str(path))
    return path


def qemu_io_reads(image: Path, *reads: str) -> subprocess.CompletedProcess[str]:
    """``qemu-io -c "read -P …"`` for each read; exit status 1 if any pattern does not match."""
    return run("qemu-io", "-f", "qcow2", *[a for r in reads for a in ("-c", r)], str(image), check=False)


def image_map(image: Path) -> list[dict[str, Any]]:
    return json.loads(run("qemu-img", "map", "--output=json", str(image)).stdout)  # type: ignore[no-any-return]


def flags_at(runs: list[dict[str, Any]], offset: int, length: int) -> set[tuple[bool, bool]]:
    """The (data, zero) pairs qemu-img map reports anywhere in ``offset``..``+length``."""
    return {(r["data"], r["zero"]) for r in runs if r["start"] < offset + length and r["start"] + r["length"] > offset}


def test_writes_and_zeroes_land_as_qemu_reads_them(tmp_path: Path, sockdir: Path) -> None:
    size = 64 * MiB
    # Old data where zeroes will be written, so punching and NO_HOLE both have something to clear.
    image = qcow2(tmp_path / "disk.qcow2", size, f"write -P 0x55 {56 * MiB} {2 * MiB}")
    big = os.urandom(40 * MiB)  # more than qemu-nbd's 32 MiB maximum request: must be split
    expected = bytearray(size)
    writes = [(0, b"\xab" * MiB), (5 * MiB + 4 * KiB, b"\xcd" * (300 * KiB)), (12 * MiB, big)]
    with serving(image, sockdir / "nbd.sock") as sock, NbdClient.connect_unix(sock, meta_contexts=()) as client:
        assert not client.read_only
        assert client.size == size
        assert client.max_request < len(big)
        for offset, data in writes[:2]:
            client.write(offset, data)
        client.write(12 * MiB, memoryview(big))
        client.write_zeroes(56 * MiB, MiB)  # may punch: the qcow2 may drop the clusters
        client.write_zeroes(57 * MiB, MiB, punch_hole=False)
        client.flush()
        assert client.read(5 * MiB + 4 * KiB, 300 * KiB) == b"\xcd" * (300 * KiB)
    for offset, data in writes:
        expected[offset : offset + len(data)] = data

    patterns = qemu_io_reads(image, f"read -P 0xab 0 {MiB}", f"read -P 0xcd {5 * MiB + 4 * KiB} {300 * KiB}",
                             f"read -P 0 {MiB} {4 * MiB}", f"read -P 0 {56 * MiB} {2 * MiB}")
    assert patterns.returncode == 0, patterns.stdout + patterns.stderr
    assert "verification failed" not in patterns.stdout
    raw = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    assert raw.read_bytes() == bytes(expected)

    runs = image_map(image)
    # Never written: unallocated, reads as zeroes. Punched: zero, no data.
    assert flags_at(runs, 52 * MiB, 4 * MiB) == {(False, True)}
    assert flags_at(runs, 58 * MiB, 6 * MiB) == {(False, True)}
    assert flags_at(runs, 1 * MiB, 4 * MiB) == {(False, True)}
    assert flags_at(runs, 56 * MiB, MiB) <= {(False, True)}
    assert flags_at(runs, 12 * MiB, 40 * MiB) == {(True, False)}


def test_write_many_pipelines_chunks_and_leaves_gaps_unallocated(tmp_path: Path, sockdir: Path) -> None:
    size = 48 * MiB + 512 * KiB  # the last chunk is partial
    image = qcow2(tmp_path / "disk.qcow2", size)
    expected = bytearray(size)
    chunks = []
    for i in range(0, 49):
        if i % 3 == 1:
            continue  # a gap: never written
        length = min(MiB, size - i * MiB)
        data = os.urandom(length)
        expected[i * MiB : i * MiB + length] = data
        chunks.append((i * MiB, data))
    with serving(image, sockdir / "nbd.sock") as sock, NbdClient.connect_unix(sock, meta_contexts=()) as client:
        assert client.write_many(iter(chunks), depth=4) == sum(len(d) for _, d in chunks)
        client.flush()
    reference = tmp_path / "expected.raw"
    reference.write_bytes(expected)
    compared = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(reference), str(image), check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    runs = image_map(image)
    for i in range(1, 49, 3):
        assert flags_at(runs, i * MiB, MiB) == {(False, True)}, i
    allocated = os.stat(image).st_blocks * 512
    assert allocated < len(chunks) * MiB + 4 * MiB  # thin: only the chunks written take space


def test_read_only_export_refuses_writes(tmp_path: Path, sockdir: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2", 4 * MiB, "write -P 0x11 0 64k")
    with serving(image, sockdir / "nbd.sock", "--read-only") as sock, \
            NbdClient.connect_unix(sock, meta_contexts=()) as client:
        assert client.read_only
        with pytest.raises(NbdError, match="read-only, so it cannot be written"):
            client.write(0, b"\x22" * 4096)
        assert client.read(0, 4) == b"\x11" * 4  # still usable for reading
    assert qemu_io_reads(image, "read -P 0x11 0 64k").returncode == 0


def test_full_disk_is_an_enospc_request_error(tmp_path: Path, sockdir: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small), check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.strip()}")
    try:
        image = qcow2(small / "disk.qcow2", 64 * MiB)
        with serving(image, sockdir / "nbd.sock") as sock, NbdClient.connect_unix(sock, meta_contexts=()) as client:
            with pytest.raises(NbdRequestError, match=r"ENOSPC") as info:
                client.write_many(((i * MiB, os.urandom(MiB)) for i in range(16)), depth=4)
            assert info.value.code == 28
    finally:
        run("umount", str(small), check=False)


# -- QemuNbd: a private qemu-nbd for one image ---------------------------------------------------


def test_qemu_nbd_helper_serves_writes_and_exits_with_the_client(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "disk.qcow2", 8 * MiB)
    server = QemuNbd(str(image))
    with server as client:
        assert not client.read_only and client.size == 8 * MiB
        client.write(MiB, b"\x7e" * (64 * KiB))
        client.flush()
        sockdir = server.sockdir
        assert os.path.exists(os.path.join(sockdir, "nbd.sock"))
    assert server.proc is not None and server.proc.returncode == 0  # it closed the image and exited
    assert not os.path.exists(sockdir)
    assert qemu_io_reads(image, f"read -P 0x7e {MiB} 64k").returncode == 0
    with QemuNbd(str(image), read_only=True) as client:
        assert client.read_only
        assert client.read(MiB, 4) == b"\x7e" * 4


def test_qemu_nbd_helper_reports_what_qemu_nbd_said(tmp_path: Path) -> None:
    with pytest.raises(HozonError, match=r"qemu-nbd could not serve .*missing\.qcow2: .*No such file"):
        QemuNbd(str(tmp_path / "missing.qcow2")).__enter__()
    image = qcow2(tmp_path / "disk.qcow2", 8 * MiB)
    server = QemuNbd(str(image))
    with pytest.raises(HozonError, match=r"qemu-nbd failed serving .*disk\.qcow2"), server as client:
        assert server.proc is not None
        server.proc.kill()  # qemu-nbd dies under the client
        server.proc.wait()
        client.write_many(((i * MiB, b"x" * MiB) for i in range(8)), depth=4)
    assert not os.path.exists(server.sockdir or "/nonexistent")
