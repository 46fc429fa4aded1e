"""Hozon's NBD client against real QEMU: qemu-nbd, and the NBD server built into QEMU itself.

Images are made with qemu-img and written with qemu-io, so every expectation (bytes, zero
regions, dirty ranges) comes from what QEMU itself wrote, and whole-disk reads are compared with
``qemu-img convert -O raw``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hozon.nbd import Extent, NbdClient, NbdError

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB  # qcow2's default cluster size, and a dirty bitmap's default granularity

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
        reason="needs qemu-nbd, qemu-img and qemu-io (Debian package qemu-utils); CI installs them",
    ),
]


# -- helpers -------------------------------------------------------------------------------------


def run(*args: str) -> str:
    done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def make_image(path: Path, size: int, writes: Sequence[tuple[int, int, int]] = ()) -> Path:
    """A qcow2 of ``size`` bytes with each ``(pattern, offset, length)`` written by qemu-io."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
    qemu_io(path, *[f"write -P {pattern:#x} {offset} {length}" for pattern, offset, length in writes])
    return path


def qemu_io(path: Path, *commands: str) -> None:
    if commands:
        run("qemu-io", "-f", "qcow2", *[arg for c in commands for arg in ("-c", c)], str(path))


def expected_bytes(size: int, writes: list[tuple[int, int, int]]) -> bytes:
    disk = bytearray(size)
    for pattern, offset, length in writes:
        disk[offset : offset + length] = bytes([pattern]) * length
    return bytes(disk)


def check_data_extents(extents: list[Extent], writes: list[tuple[int, int, int]]) -> None:
    """Data extents cover every write and stay within the qcow2 clusters the writes touched.

    How much of a partly written cluster counts as data depends on the host file system (QEMU
    asks it with SEEK_DATA), so only these bounds are exact.
    """
    data = [(e.offset, e.offset + e.length) for e in extents if not e.zero]
    for _, offset, length in writes:
        assert any(lo <= offset and offset + length <= hi for lo, hi in data), (offset, length, data)
    clusters = {c for _, offset, length in writes for c in range(offset // CLUSTER, -(-(offset + length) // CLUSTER))}
    for lo, hi in data:
        assert all(c in clusters for c in range(lo // CLUSTER, -(-hi // CLUSTER))), (lo, hi)


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            errors = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {errors}")
        if os.path.exists(path) and _listening(path):  # bound is not yet listening (a connect is refused)
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {path}")


def _listening(path: str) -> bool:
    """Whether a unix socket at ``path`` is listening, seen in /proc/net/unix without connecting (a
    connection would count as qemu-nbd's one client, and it exits when that client leaves)."""
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                return True
    return False


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hozon-nbd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path, *extra: str) -> Iterator[str]:
    args = ["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--persistent", "--shared=4", *extra, str(image)]
    with stopping(subprocess.Popen(args, stderr=subprocess.PIPE)) as proc:
        wait_for_socket(str(sock), proc, "qemu-nbd")
        yield str(sock)


# -- qemu-nbd ------------------------------------------------------------------------------------

WRITES = [
    (0xAB, 0, 64 * KiB),
    (0xCD, 1 * MiB, 128 * KiB),
    (0xEF, 10 * MiB + 4 * KiB, 8 * KiB),  # inside one cluster, not aligned to it
    (0x11, 63 * MiB, 1 * MiB),  # the very end of the disk
]


@pytest.fixture
def patterned(tmp_path: Path, sockdir: Path) -> Iterator[str]:
    image = make_image(tmp_path / "disk.qcow2", 64 * MiB, WRITES)
    with qemu_nbd(image, sockdir / "nbd.sock", "--read-only") as path:
        yield path


def test_read_returns_what_qemu_io_wrote(patterned: str) -> None:
    with NbdClient.connect_unix(patterned) as client:
        assert client.size == 64 * MiB
        assert client.structured_replies
        assert client.meta_contexts == ("base:allocation",)
        for pattern, offset, length in WRITES:
            assert client.read(offset, length) == bytes([pattern]) * length
        assert client.read(64 * KiB, 1 * MiB - 64 * KiB) == bytes(1 * MiB - 64 * KiB)
        # across a boundary between data and never-written space, at odd offsets
        assert client.read(1 * MiB - 3, 10) == bytes(3) + b"\xcd" * 7
        assert client.read(10 * MiB + 4 * KiB - 1, 8 * KiB + 2) == b"\0" + b"\xef" * 8 * KiB + b"\0"


def test_allocation_reports_written_clusters_as_data_and_the_rest_as_zero(patterned: str) -> None:
    with NbdClient.connect_unix(patterned) as client:
        extents = client.allocation()
        assert extents[0].offset == 0 and sum(e.length for e in extents) == client.size
        assert all(a.offset + a.length == b.offset and a.zero != b.zero for a, b in itertools.pairwise(extents))
        check_data_extents(extents, WRITES)
        aligned = [(e.offset, e.length) for e in extents if not e.zero and e.offset % CLUSTER == 0]
        assert aligned[:2] == [(0, 64 * KiB), (1 * MiB, 128 * KiB)] and aligned[-1] == (63 * MiB, 1 * MiB)
        for extent in extents:
            if extent.zero:
                assert client.read(extent.offset, extent.length) == bytes(extent.length)
        # a sub-range is clipped exactly
        assert client.allocation(32 * KiB, 1 * MiB) == [
            Extent(32 * KiB, 32 * KiB, False),
            Extent(64 * KiB, 1 * MiB - 64 * KiB, True),
            Extent(1 * MiB, 32 * KiB, False),
        ]


def test_zeroes_written_as_zero_clusters_are_reported_zero(tmp_path: Path, sockdir: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", 8 * MiB, [(0x5A, 0, 4 * MiB)])
    qemu_io(image, f"write -z {1 * MiB} {1 * MiB}")
    with qemu_nbd(image, sockdir / "nbd.sock", "--read-only") as path, NbdClient.connect_unix(path) as client:
        assert client.allocation() == [
            Extent(0, 1 * MiB, False),
            Extent(1 * MiB, 1 * MiB, True),
            Extent(2 * MiB, 2 * MiB, False),
            Extent(4 * MiB, 4 * MiB, True),
        ]
        assert client.read(1 * MiB, 1 * MiB) == bytes(1 * MiB)


@pytest.fixture
def random_disk(tmp_path: Path, sockdir: Path) -> Iterator[tuple[str, Path]]:
    """A 48 MiB qcow2 of random bytes (with a few holes), served read-only; and the image path."""
    raw = tmp_path / "disk.raw"
    rng = random.Random(7)
    with raw.open("wb") as out:
        for i in range(48):
            out.write(bytes(MiB) if i % 7 == 3 else rng.randbytes(MiB))
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    with qemu_nbd(image, sockdir / "nbd.sock", "--read-only") as path:
        yield path, image


def test_whole_disk_read_equals_qemu_img_convert(random_disk: tuple[str, Path], tmp_path: Path) -> None:
    path, image = random_disk
    reference = tmp_path / "reference.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(reference))
    expected = reference.read_bytes()
    with NbdClient.connect_unix(path) as client:
        assert client.size == len(expected)
        assert client.read(0, client.size) == expected  # one read, split into 32 MiB requests
        pieces = b"".join(data for _, data in client.read_many((o, MiB) for o in range(0, client.size, MiB)))
        assert pieces == expected
        zero_extents = [e for e in client.allocation() if e.zero]
        assert zero_extents and all(expected[e.offset : e.offset + e.length].count(0) == e.length for e in zero_extents)


def test_read_many_yields_in_the_order_asked(random_disk: tuple[str, Path], tmp_path: Path) -> None:
    path, image = random_disk
    reference = tmp_path / "reference.raw"
    run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(reference))
    expected = reference.read_bytes()
    rng = random.Random(11)
    wanted = [(rng.randrange(0, len(expected) - 3 * MiB), rng.choice([1, 4 * KiB, MiB, 3 * MiB])) for _ in range(60)]
    with NbdClient.connect_unix(path) as client:
        for depth in (1, 4, 16):
            got = list(client.read_many(iter(wanted), depth=depth))
            assert [offset for offset, _ in got] == [offset for offset, _ in wanted]
            for (offset, length), (_, data) in zip(wanted, got, strict=True):
                assert data == expected[offset : offset + length]


def test_dirty_bitmap_lists_writes_made_after_it(tmp_path: Path, sockdir: Path) -> None:
    before = [(0x01, 0, 256 * KiB), (0x02, 5 * MiB, 64 * KiB)]
    after = [(0x03, 2 * MiB, 128 * KiB), (0x04, 5 * MiB, 64 * KiB), (0x05, 9 * MiB + 10 * KiB, 1 * KiB)]
    image = make_image(tmp_path / "disk.qcow2", 16 * MiB, before)
    run("qemu-img", "bitmap", "--add", "--enable", str(image), "b0")
    qemu_io(image, *[f"write -P {pattern:#x} {offset} {length}" for pattern, offset, length in after])
    contexts = ("base:allocation", "qemu:dirty-bitmap:b0")
    with (
        qemu_nbd(image, sockdir / "nbd.sock", "--read-only", "--bitmap=b0") as path,
        NbdClient.connect_unix(path, meta_contexts=contexts) as client,
    ):
        assert set(client.meta_contexts) == set(contexts)
        assert client.dirty_extents("b0") == [(2 * MiB, 128 * KiB), (5 * MiB, 64 * KiB), (9 * MiB, CLUSTER)]
        assert client.dirty_extents("b0", 2 * MiB + 4 * KiB, 3 * MiB) == [
            (2 * MiB + 4 * KiB, 124 * KiB),
            (5 * MiB, 4 * KiB),
        ]
        check_data_extents(client.allocation(), before + after)
        assert client.read(5 * MiB, 64 * KiB) == b"\x04" * 64 * KiB
        with pytest.raises(NbdError, match="qemu:dirty-bitmap:other"):
            client.dirty_extents("other")


def test_tcp_and_named_exports(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", 4 * MiB, [(0x42, 1 * MiB, 64 * KiB)])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["qemu-nbd", "--bind=127.0.0.1", f"--port={port}", "--export-name=disk0", "--format=qcow2"]
    args += ["--persistent", "--shared=4", "--read-only", str(image)]
    with stopping(subprocess.Popen(args, stderr=subprocess.PIPE)):
        deadline = time.monotonic() + 20
        while True:
            try:
                client = NbdClient.connect_tcp("127.0.0.1", port, export="disk0", timeout=5)
                break
            except NbdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with client:
            assert client.size == 4 * MiB
            assert client.read(1 * MiB, 64 * KiB) == b"\x42" * 64 * KiB
            assert [e.zero for e in client.allocation()] == [True, False, True]
        with pytest.raises(NbdError, match="no export named 'nope'"):
            NbdClient.connect_tcp("127.0.0.1", port, export="nope", timeout=5)


def test_unreachable_server_is_a_clear_error(sockdir: Path) -> None:
    with pytest.raises(NbdError, match="cannot connect to the NBD server at"):
        NbdClient.connect_unix(str(sockdir / "missing.sock"), timeout=2)


def test_killed_server_mid_stream_raises_instead_of_hanging(random_disk: tuple[str, Path], sockdir: Path) -> None:
    # a second server of our own, so it can be killed while a read is in flight
    image = random_disk[1]
    sock = sockdir / "victim.sock"
    proc = subprocess.Popen(["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--read-only", "--shared=4", str(image)])
    with stopping(proc):
        wait_for_socket(str(sock), proc, "qemu-nbd")
        client = NbdClient.connect_unix(str(sock), timeout=5)
        reads = client.read_many(((o, MiB) for o in range(0, client.size, MiB)), depth=4)
        next(reads)
        proc.kill()
        proc.wait()
        started = time.monotonic()
        with pytest.raises(NbdError):
            for _ in reads:
                pass
        assert time.monotonic() - started < 10
        client.close()


# -- QEMU's own NBD server -----------------------------------------------------------------------


class Qmp:
    """Just enough QMP for a test: one command at a time, events skipped."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command} failed: {reply['error']}")

    def hmp(self, command_line: str) -> str:
        output = self.execute("human-monitor-command", **{"command-line": command_line})
        assert isinstance(output, str)
        return output

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")
def test_qemu_builtin_nbd_server_with_a_dirty_bitmap(tmp_path: Path, sockdir: Path) -> None:
    writes = [(0x21, 0, 128 * KiB), (0x22, 3 * MiB, 64 * KiB)]
    image = make_image(tmp_path / "disk.qcow2", 8 * MiB, writes)
    qmp_path, nbd_path = sockdir / "qmp.sock", sockdir / "nbd.sock"
    args = [
        "qemu-system-x86_64",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "none",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-blockdev",
        f"driver=qcow2,node-name=d0,file.driver=file,file.filename={image}",
    ]
    with stopping(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) as proc:
        wait_for_socket(str(qmp_path), proc, "qemu-system-x86_64")
        qmp = Qmp(str(qmp_path))
        try:
            qmp.execute("block-dirty-bitmap-add", node="d0", name="b1")
            qmp.hmp(f'qemu-io d0 "write -P 0x33 {5 * MiB} {128 * KiB}"')  # qemu-io reports on QEMU's stdout
            qmp.execute("block-dirty-bitmap-disable", node="d0", name="b1")  # an enabled one cannot be exported
            qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_path)}})
            qmp.execute("block-export-add", type="nbd", id="e0", **{"node-name": "d0"}, name="d0", bitmaps=["b1"])
            contexts = ("base:allocation", "qemu:dirty-bitmap:b1")
            with NbdClient.connect_unix(str(nbd_path), export="d0", meta_contexts=contexts) as client:
                assert client.size == 8 * MiB
                assert client.read(0, client.size) == expected_bytes(8 * MiB, [*writes, (0x33, 5 * MiB, 128 * KiB)])
                assert [(e.offset, e.length) for e in client.allocation() if not e.zero] == [
                    (0, 128 * KiB),
                    (3 * MiB, 64 * KiB),
                    (5 * MiB, 128 * KiB),
                ]
                assert client.dirty_extents("b1") == [(5 * MiB, 128 * KiB)]
                got = list(client.read_many([(3 * MiB, 64 * KiB), (0, 4 * KiB), (5 * MiB, 1 * MiB)], depth=3))
                assert [(o, len(d)) for o, d in got] == [(3 * MiB, 64 * KiB), (0, 4 * KiB), (5 * MiB, 1 * MiB)]
                assert got[2][1] == b"\x33" * 128 * KiB + bytes(MiB - 128 * KiB)
            with pytest.raises(NbdError, match="no export named"):
                NbdClient.connect_unix(str(nbd_path), export="d1")
            qmp.execute("quit")
        finally:
            qmp.close()
