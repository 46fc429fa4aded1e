"""Point-in-time fleecing of a running VM's disks against a real qemu-system-x86_64.

The VM is paused (no guest code); guest writes come from HMP ``qemu-io -d NAME/virtio-backend`` on
the test's own monitor, which goes through the device like a guest write (and marks dirty bitmaps),
while Hozon holds the second monitor. Exports are read with Hozon's NbdClient, and every expectation
is a model of the disk content kept by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hozon.errors import HozonError
from hozon.nbd import NbdClient
from hozon.sources.qemu import (
    Disk,
    DiskExport,
    PointInTime,
    QmpClient,
    QmpError,
    bitmaps,
    cleanup_leftovers,
    list_disks,
)

if TYPE_CHECKING:
    from conftest import QemuVm, QemuVmFactory

KiB = 1024
MiB = 1024 * KiB
GRANULE = 64 * KiB  # a dirty bitmap's default granularity on a qcow2 with 64 KiB clusters

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-io") is None,
        reason="needs qemu-system-x86_64, qemu-img and qemu-io (Debian qemu-system-x86, qemu-utils); CI installs them",
    ),
]


# -- helpers -------------------------------------------------------------------------------------


class Guest:
    """Writes through the VM's devices (on the test's monitor) and the disk content they make."""

    def __init__(self, vm: QemuVm, monitor: QmpClient, sizes: dict[str, int]) -> None:
        self.vm = vm
        self.monitor = monitor
        self.content = {name: bytearray(size) for name, size in sizes.items()}

    def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        output = self.monitor.hmp(f'qemu-io -d {self.vm.disks[disk].qemu_io_device} '
                                  f'"write -P {pattern:#x} {offset} {length}"')
        assert output == "", output  # HMP qemu-io says nothing on success
        self.content[disk][offset : offset + length] = bytes([pattern]) * length

    def snapshot(self) -> dict[str, bytes]:
        return {name: bytes(data) for name, data in self.content.items()}


def read_all(export: DiskExport) -> bytes:
    with NbdClient.connect_unix(export.socket, export=export.export) as client:
        assert client.size == export.disk.size and client.read_only
        return client.read(0, client.size)


def dirty(export: DiskExport) -> list[tuple[int, int]]:
    assert export.dirty_context is not None
    with NbdClient.connect_unix(export.socket, export=export.export,
                                meta_contexts=("base:allocation", export.dirty_context)) as client:
        return client.dirty_extents(export.dirty_context.removeprefix("qemu:dirty-bitmap:"))


def granules(*writes: tuple[int, int]) -> list[tuple[int, int]]:
    """The ``(offset, length)`` writes widened to whole granules and merged, as a bitmap reports them."""
    marked = sorted({g for offset, length in writes
                     for g in range(offset // GRANULE, -(-(offset + length) // GRANULE))})
    runs: list[tuple[int, int]] = []
    for g in marked:
        if runs and runs[-1][0] + runs[-1][1] == g * GRANULE:
            runs[-1] = (runs[-1][0], runs[-1][1] + GRANULE)
        else:
            runs.append((g * GRANULE, GRANULE))
    return runs


def block_node_names(client: QmpClient) -> list[str]:
    return [n["node-name"] for n in client.execute("query-named-block-nodes", {"flat": True})]


def assert_clean(client: QmpClient, scratch: Path) -> None:
    """Nothing of a fleecing is left in QEMU or in the scratch directory."""
    assert client.execute("query-block-jobs") == []
    assert client.execute("query-block-exports") == []
    names = block_node_names(client)
    assert not [n for n in names if n.startswith("hozon-")], names
    for disk in list_disks(client):
        assert not [b for b in bitmaps(client, disk) if b.endswith("-frozen")]
    probe = Path(tempfile.mkdtemp(prefix="hozon-t-")) / "probe.sock"
    try:  # QEMU's NBD server was stopped: a new one starts
        client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(probe)}}})
        client.execute("nbd-server-stop")
    finally:
        shutil.rmtree(probe.parent, ignore_errors=True)
    assert not scratch.exists() or list(scratch.iterdir()) == []


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short scratch directory, so the NBD socket fits in it."""
    path = Path(tempfile.mkdtemp(prefix="hozon-fl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def two_disk_vm(qemu_vm: QemuVmFactory) -> QemuVm:
    return qemu_vm(disks=[("vda", "64M"), ("vdb", "16M")])


# -- the tests -----------------------------------------------------------------------------------


def test_full_backup_reads_every_disk_as_it_was_at_the_instant(qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = two_disk_vm(qemu_vm)
    # a long scratch path: the NBD socket then goes to a private temporary directory
    scratch = tmp_path / ("scratch-with-a-long-name-" + "x" * 60)
    with vm.monitor() as monitor, QmpClient.connect(vm.hozon_qmp_path) as hozon:
        guest = Guest(vm, monitor, {"vda": 64 * MiB, "vdb": 16 * MiB})
        guest.write("vda", 0xAB, 0, 64 * KiB)
        guest.write("vda", 0xCD, 1 * MiB, 192 * KiB)
        guest.write("vda", 0x11, 63 * MiB, 1 * MiB)
        guest.write("vdb", 0x22, 4 * KiB, 8 * KiB)
        disks = list_disks(hozon)
        assert disks == [Disk("vda", "vda-format", str(vm.disks["vda"].path), "qcow2", 64 * MiB),
                         Disk("vdb", "vdb-format", str(vm.disks["vdb"].path), "qcow2", 16 * MiB)]

        pit = PointInTime(hozon, disks, scratch, "hozon-1")
        with pit as exports:
            instant = guest.snapshot()
            assert set(exports) == {"vda", "vdb"}
            assert all(e.dirty_context is None for e in exports.values())
            assert len(list(scratch.iterdir())) == 2  # one scratch image per disk
            # the guest goes on writing, over old data and into never-written space
            guest.write("vda", 0xEE, 0, 128 * KiB)
            guest.write("vda", 0xEF, 1 * MiB + 64 * KiB, 4 * KiB)
            guest.write("vda", 0xF0, 32 * MiB, 1 * MiB)
            guest.write("vdb", 0xF1, 0, 16 * MiB)
            # a disk's node is its format node, even with the backup job's filter above it
            assert [d.node for d in list_disks(hozon)] == ["vda-format", "vdb-format"]
            for name, export in exports.items():
                assert read_all(export) == instant[name], name
            # reading piece by piece while the guest overwrites what is read next
            with NbdClient.connect_unix(exports["vda"].socket, export="vda") as client:
                for offset in range(0, 4 * MiB, 256 * KiB):
                    guest.write("vda", 0x40 + offset // (256 * KiB), offset + 256 * KiB, 256 * KiB)
                    assert client.read(offset, 256 * KiB) == instant["vda"][offset : offset + 256 * KiB], offset
            assert Path(exports["vda"].socket).exists()
            pit.commit()
        print(f"\npause_seconds (2 disks): {pit.pause_seconds * 1000:.2f} ms")
        assert 0 < pit.pause_seconds < 5
        assert pit.cleanup_failures == []
        assert not Path(exports["vda"].socket).exists()
        assert not Path(exports["vda"].socket).parent.exists()  # the private socket directory, too
        assert_clean(hozon, scratch)
        for disk in disks:
            found = bitmaps(hozon, disk)
            assert set(found) == {"hozon-1"}
            assert found["hozon-1"].recording and found["hozon-1"].persistent
            assert not found["hozon-1"].busy and not found["hozon-1"].inconsistent


def test_incremental_exports_exactly_the_changes_since_the_last_backup(qemu_vm: QemuVmFactory, scratch: Path) -> None:
    vm = two_disk_vm(qemu_vm)
    with vm.monitor() as monitor, QmpClient.connect(vm.hozon_qmp_path) as hozon:
        guest = Guest(vm, monitor, {"vda": 64 * MiB, "vdb": 16 * MiB})
        guest.write("vda", 0xAB, 0, 2 * MiB)
        disks = list_disks(hozon)
        with (pit := PointInTime(hozon, disks, scratch, "hozon-1")) as exports:  # the first backup: full
            assert read_all(exports["vda"])[: 2 * MiB] == b"\xab" * 2 * MiB
            pit.commit()

        changed = {"vda": [(1 * MiB, 64 * KiB), (10 * MiB + 4 * KiB, 8 * KiB), (20 * MiB - 1 * KiB, 2 * KiB)],
                   "vdb": [(3 * MiB, 200 * KiB)]}
        for i, (name, writes) in enumerate(changed.items()):
            for j, (offset, length) in enumerate(writes):
                guest.write(name, 0x30 + 16 * i + j, offset, length)

        pit = PointInTime(hozon, disks, scratch, "hozon-2", since={"vda": "hozon-1", "vdb": "hozon-1"})
        with pit as exports:
            instant = guest.snapshot()
            guest.write("vda", 0x77, 40 * MiB, 64 * KiB)  # after the instant: not in this backup's changes
            guest.write("vda", 0x78, 1 * MiB, 4 * KiB)
            for name, export in exports.items():
                assert export.dirty_context == "qemu:dirty-bitmap:hozon-2-frozen"
                extents = dirty(export)
                assert extents == granules(*changed[name]), name
                with NbdClient.connect_unix(export.socket, export=export.export) as client:
                    for offset, length in extents:
                        assert client.read(offset, length) == instant[name][offset : offset + length]
            # the since bitmap is untouched meanwhile: still recording, not busy
            assert bitmaps(hozon, disks[0])["hozon-1"].recording
            pit.commit()
        assert_clean(hozon, scratch)
        for disk in disks:
            found = bitmaps(hozon, disk)
            assert set(found) == {"hozon-2"} and found["hozon-2"].recording and found["hozon-2"].persistent
        # hozon-2 recorded the writes made during the backup
        with PointInTime(hozon, disks, scratch, "hozon-3", since={"vda": "hozon-2"}) as exports:
            assert dirty(exports["vda"]) == granules((1 * MiB, 4 * KiB), (40 * MiB, 64 * KiB))
            assert exports["vdb"].dirty_context is None


def test_a_failed_backup_leaves_the_since_bitmap_recording_with_every_change(
        qemu_vm: QemuVmFactory, scratch: Path) -> None:
    vm = two_disk_vm(qemu_vm)
    with vm.monitor() as monitor, QmpClient.connect(vm.hozon_qmp_path) as hozon:
        guest = Guest(vm, monitor, {"vda": 64 * MiB, "vdb": 16 * MiB})
        disks = list_disks(hozon)
        with (pit := PointInTime(hozon, disks, scratch, "hozon-1")):
            pit.commit()
        guest.write("vda", 0x01, 2 * MiB, 64 * KiB)
        guest.write("vdb", 0x02, 0, 4 * KiB)

        since = {"vda": "hozon-1", "vdb": "hozon-1"}
        with pytest.raises(RuntimeError, match="the repository failed"), \
                PointInTime(hozon, disks, scratch, "hozon-2", since=since) as exports:
            assert dirty(exports["vda"]) == granules((2 * MiB, 64 * KiB))
            guest.write("vda", 0x03, 5 * MiB, 128 * KiB)  # during the failed attempt
            guest.write("vdb", 0x04, 8 * MiB, 4 * KiB)
            raise RuntimeError("the repository failed")
        assert_clean(hozon, scratch)
        for disk in disks:
            found = bitmaps(hozon, disk)
            assert set(found) == {"hozon-1"}, "the new bitmap is removed"
            assert found["hozon-1"].recording and not found["hozon-1"].busy

        # the next backup still sees every change since hozon-1: before AND during the failed attempt
        with PointInTime(hozon, disks, scratch, "hozon-2", since=since) as exports:
            assert dirty(exports["vda"]) == granules((2 * MiB, 64 * KiB), (5 * MiB, 128 * KiB))
            assert dirty(exports["vdb"]) == granules((0, 4 * KiB), (8 * MiB, 4 * KiB))
        assert_clean(hozon, scratch)


KILLED_SCRIPT = """
import json, sys, time
from pathlib import Path
from hozon.errors import HozonError
from hozon.nbd import NbdClient
from hozon.sources.qemu import PointInTime, QmpClient, list_disks
qmp = QmpClient.connect(sys.argv[1])
pit = PointInTime(qmp, list_disks(qmp), Path(sys.argv[2]), "hozon-2", since=json.loads(sys.argv[3]))
exports = pit.__enter__()
reader = NbdClient.connect_unix(exports["vda"].socket, export="vda")   # a reader connected at the kill
reader.read(0, 4096)
print("ready", flush=True)
time.sleep(600)
"""


def test_kill_9_leaves_leftovers_that_cleanup_removes(qemu_vm: QemuVmFactory, scratch: Path) -> None:
    vm = two_disk_vm(qemu_vm)
    with vm.monitor() as monitor:
        guest = Guest(vm, monitor, {"vda": 64 * MiB, "vdb": 16 * MiB})
        with QmpClient.connect(vm.hozon_qmp_path) as hozon, (pit := PointInTime(hozon, list_disks(hozon), scratch,
                                                                                "hozon-1")):
            pit.commit()
        guest.write("vda", 0x0A, 0, 64 * KiB)

        since = {"vda": "hozon-1", "vdb": "hozon-1"}
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SCRIPT, str(vm.hozon_qmp_path), str(scratch),
                                 json.dumps(since)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read() if proc.stderr else line
            guest.write("vda", 0x0B, 3 * MiB, 64 * KiB)  # during the killed backup
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

        # the killed process's monitor connection is free again once QEMU has noticed the hang-up
        deadline = time.monotonic() + 10
        while True:
            try:
                hozon = QmpClient.connect(vm.hozon_qmp_path, timeout=1)
                break
            except QmpError:
                if time.monotonic() > deadline:
                    raise
        with hozon:
            disks = list_disks(hozon)
            assert [d.node for d in disks] == ["vda-format", "vdb-format"]  # through the left-over filter
            assert {b for d in disks for b in bitmaps(hozon, d)} == {"hozon-1", "hozon-2"}
            assert len(hozon.execute("query-block-jobs")) == 2
            assert len(list(scratch.glob("*.qcow2"))) == 2

            removed = cleanup_leftovers(hozon, "hozon-", keep={"hozon-1"})
            print("\nremoved:", *removed, sep="\n  ")
            assert set(removed) >= {"NBD export hozon-fleece-vda", "NBD export hozon-fleece-vdb", "QEMU's NBD server",
                                    "block job hozon-fleece-vda", "block job hozon-fleece-vdb",
                                    "node hozon-fleece-vda", "node hozon-fleece-vdb",
                                    "bitmap hozon-2 on node vda-format", "bitmap hozon-2 on node vdb-format"}
            assert len([r for r in removed if r.startswith("scratch image")]) == 2
            assert_clean(hozon, scratch)
            assert {b for d in disks for b in bitmaps(hozon, d)} == {"hozon-1"}
            assert cleanup_leftovers(hozon, "hozon-", keep={"hozon-1"}) == []  # nothing left to do

            with PointInTime(hozon, disks, scratch, "hozon-2", since=since) as exports:
                assert dirty(exports["vda"]) == granules((0, 64 * KiB), (3 * MiB, 64 * KiB))
                assert read_all(exports["vda"])[: 64 * KiB] == b"\x0a" * 64 * KiB
            assert_clean(hozon, scratch)


def test_the_vm_quitting_during_the_backup_leaves_no_scratch_files(qemu_vm: QemuVmFactory, scratch: Path) -> None:
    vm = two_disk_vm(qemu_vm)
    with QmpClient.connect(vm.hozon_qmp_path) as hozon:
        pit = PointInTime(hozon, list_disks(hozon), scratch, "hozon-1")
        with pit as exports:
            assert read_all(exports["vdb"]) == bytes(16 * MiB)
            assert len(list(scratch.iterdir())) >= 2
            vm.kill()
        print("\ncleanup failures:", *pit.cleanup_failures, sep="\n  ")
        assert len(pit.cleanup_failures) == 1 and "did QEMU quit?" in pit.cleanup_failures[0]
        assert list(scratch.iterdir()) == []

    # the same with an error in flight: it propagates, with what could not be cleaned as a note
    vm = two_disk_vm(qemu_vm)
    with QmpClient.connect(vm.hozon_qmp_path) as hozon:
        with pytest.raises(QmpError) as caught, PointInTime(hozon, list_disks(hozon), scratch, "hozon-1"):
            vm.kill()
            hozon.execute("query-status")
        assert "closed the connection" in str(caught.value)
        notes = getattr(caught.value, "__notes__", [])
        print("\nnotes:", *notes, sep="\n  ")
        assert any("could not clean up" in note and "did QEMU quit?" in note for note in notes)
        assert list(scratch.iterdir()) == []


def test_refusals_leave_nothing_behind(qemu_vm: QemuVmFactory, scratch: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    vm = two_disk_vm(qemu_vm)
    with vm.monitor() as monitor, QmpClient.connect(vm.hozon_qmp_path) as hozon:
        disks = list_disks(hozon)
        with pytest.raises(QmpError, match="disk vda has no bitmap hozon-0 to take the changes from"), \
                PointInTime(hozon, disks, scratch, "hozon-1", since={"vda": "hozon-0"}):
            pass
        assert_clean(hozon, scratch)
        monitor.execute("block-dirty-bitmap-add", {"node": "vdb-format", "name": "hozon-1"})
        with pytest.raises(QmpError, match="disk vdb already has a bitmap named hozon-1"), \
                PointInTime(hozon, disks, scratch, "hozon-1"):
            pass
        assert_clean(hozon, scratch)
        assert set(bitmaps(hozon, disks[1])) == {"hozon-1"}  # not ours to remove
        # a disk grown since list_disks: its Disk is stale
        monitor.execute("block_resize", {"node-name": "vdb-format", "size": 32 * MiB})
        with pytest.raises(QmpError, match=r"disk vdb is now 33554432 bytes, not 16777216"), \
                PointInTime(hozon, disks, scratch, "hozon-2"):
            pass
        assert_clean(hozon, scratch)
        disks = list_disks(hozon)
        assert disks[1].size == 32 * MiB
        # a scratch directory that cannot be made
        (scratch / "file").write_bytes(b"")
        with pytest.raises(HozonError, match="cannot create the scratch directory"), \
                PointInTime(hozon, disks, scratch / "file", "hozon-2"):
            pass
        (scratch / "file").unlink()

        # QEMU refuses the transaction (another tool took the bitmap name after the check): all of
        # it is undone, and the other tool's bitmap stays
        real = hozon.transaction

        def racing(*args: Any, **kwargs: Any) -> None:
            monitor.execute("block-dirty-bitmap-add", {"node": "vdb-format", "name": "hozon-2"})
            real(*args, **kwargs)

        monkeypatch.setattr(hozon, "transaction", racing)
        pit = PointInTime(hozon, disks, scratch, "hozon-2", since={"vdb": "hozon-1"})
        with pytest.raises(QmpError, match="transaction failed"), pit:
            pass
        monkeypatch.undo()
        assert pit.cleanup_failures == []
        assert_clean(hozon, scratch)
        assert set(bitmaps(hozon, disks[0])) == set()
        assert set(bitmaps(hozon, disks[1])) == {"hozon-1", "hozon-2"}
        with PointInTime(hozon, disks, scratch, "hozon-3", since={"vdb": "hozon-1"}) as exports:
            assert dirty(exports["vdb"]) == []


def test_disks_are_the_writable_devices_with_media(qemu_vm: QemuVmFactory, tmp_path: Path, scratch: Path) -> None:
    for name, fmt in (("cd.iso", "raw"), ("ro.raw", "raw"), ("anon.qcow2", "qcow2"), ("plain.raw", "raw")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / name), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(tmp_path / "v2.qcow2"), "4M"],
                   check=True)
    vm = qemu_vm(disks=[("vda", "8M")], extra_args=[
        "-drive", f"file={tmp_path / 'cd.iso'},if=none,id=cd0,media=cdrom,format=raw",
        "-device", "ide-cd,drive=cd0,id=cdrom,bus=ide.0",
        "-drive", "if=none,id=empty0", "-device", "ide-cd,drive=empty0,id=cdrom2,bus=ide.1",
        "-drive", f"file={tmp_path / 'ro.raw'},if=none,id=ro0,readonly=on,format=raw",
        "-device", "virtio-blk-pci,drive=ro0,id=vdro",
        "-drive", f"file={tmp_path / 'anon.qcow2'},if=virtio,format=qcow2",
        "-drive", f"file={tmp_path / 'plain.raw'},if=none,id=plain0,format=raw",
        "-device", "virtio-blk-pci,drive=plain0,id=vdraw",
        "-drive", f"file={tmp_path / 'v2.qcow2'},if=none,id=v2,format=qcow2",
        "-device", "virtio-blk-pci,drive=v2,id=vdv2",
    ])
    with vm.monitor() as monitor, QmpClient.connect(vm.hozon_qmp_path) as hozon:
        disks = list_disks(hozon)
        assert [(d.name, d.format, d.size, d.filename) for d in disks] == [
            ("vda", "qcow2", 8 * MiB, str(vm.disks["vda"].path)),
            ("vdraw", "raw", 4 * MiB, str(tmp_path / "plain.raw")),
            ("vdv2", "qcow2", 4 * MiB, str(tmp_path / "v2.qcow2")),
            ("virtio0", "qcow2", 4 * MiB, str(tmp_path / "anon.qcow2")),
        ]
        output = monitor.hmp('qemu-io -d vdraw/virtio-backend "write -P 0x5c 1M 64k"')
        assert output == "", output
        with (pit := PointInTime(hozon, disks, scratch, "hozon-1")) as exports:
            assert read_all(exports["vdraw"])[1 * MiB : 1 * MiB + 64 * KiB] == b"\x5c" * 64 * KiB
            assert read_all(exports["virtio0"]) == bytes(4 * MiB)
            pit.commit()
        # raw and qcow2 v2 images cannot store bitmaps: the new one is kept in QEMU's memory only
        assert [bitmaps(hozon, d)["hozon-1"].persistent for d in disks] == [True, False, False, True]
        assert_clean(hozon, scratch)
