"""Image-level VM backups against a real QEMU: full, incremental, every way the chain breaks.

The VM runs no guest code (``-S``); "guest writes" go through the virtio device with HMP
``qemu-io``, so they pass through the block layer and mark dirty bitmaps like a guest's would.
A model of each disk (a bytearray) says what every snapshot must restore to.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.conftest import Hozon

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVm, QemuVmFactory

MiB = 1 << 20


class Model:
    """What each disk of the VM holds, written through the device and mirrored here."""

    def __init__(self, vm: QemuVm, sizes: dict[str, int]) -> None:
        self.vm = vm
        self.disks = {name: bytearray(size) for name, size in sizes.items()}

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        with self.vm.monitor() as qmp:
            out = qmp.hmp(f'qemu-io -d {disk}/virtio-backend "write -P {pattern} {offset} {length}"')
        assert "error" not in out.lower(), out
        self.disks[disk][offset : offset + length] = bytes([pattern]) * length

    def copy(self) -> dict[str, bytes]:
        return {name: bytes(data) for name, data in self.disks.items()}


def vm_backup(hozon: Hozon, vm: QemuVm, *args: str) -> dict:
    result = hozon("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "web1", "--json", *args)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def disk_modes(result: dict) -> dict[str, str]:
    return {d["name"]: d["mode"] for d in result["snapshot"]["extra"]["disks"]}


def assert_restores(hozon: Hozon, tmp_path: Path, snapshot_id: str, expected: dict[str, bytes]) -> None:
    target = tmp_path / f"restore-{snapshot_id[:8]}"
    hozon("vm", "restore", snapshot_id[:8], "--to", str(target), "--format", "raw")
    for name, data in expected.items():
        restored = (target / f"{name}.raw").read_bytes()
        assert len(restored) == len(data), name
        assert restored == data, f"disk {name} of snapshot {snapshot_id[:8]} differs"
    assert {p.suffix for p in target.iterdir()} <= {".raw", ".json", ".xml"}


def test_full_then_incremental_backups_restore_every_snapshot(hozon: Hozon, qemu_vm: QemuVmFactory,
                                                                tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "64M"), ("vdb", "32M")])
    model = Model(vm, {"vda": 64 * MiB, "vdb": 32 * MiB})
    model.write("vda", 0, 4 * MiB, 0xA1)
    model.write("vda", 40 * MiB, 3 * MiB + 4096, 0xA2)
    model.write("vdb", 5 * MiB, 64 * 1024, 0xB1)

    first = vm_backup(hozon, vm)
    assert disk_modes(first) == {"vda": "full", "vdb": "full"}
    expected = {first["snapshot"]["id"]: model.copy()}
    summary = first["snapshot"]["summary"]
    assert summary["bytes_read"] <= 9 * MiB  # only allocated chunks are read, zeros are not

    for round_ in range(3):
        model.write("vda", (10 + round_) * MiB + 512, 8192, 0xC0 + round_)
        model.write("vdb", 1 * MiB, 4096, 0xD0 + round_)
        result = vm_backup(hozon, vm)
        assert disk_modes(result) == {"vda": "incremental", "vdb": "incremental"}, result["notes"]
        assert result["snapshot"]["summary"]["bytes_read"] <= 2 * MiB
        expected[result["snapshot"]["id"]] = model.copy()

    for snapshot_id, disks in expected.items():
        assert_restores(hozon, tmp_path, snapshot_id, disks)

    assert "no errors were found" in hozon("check", "--read-data").stdout
    listing = json.loads(hozon("vm", "ls", "--json").stdout)
    assert [e["id"] for e in listing["web1"]] == list(expected)


def test_a_resized_disk_is_read_fully_and_said_so(hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", 0, MiB, 0x11)
    vm_backup(hozon, vm)
    with vm.monitor() as qmp:
        qmp.execute("block_resize", {"node-name": "vda-format", "size": 24 * MiB})
    model.disks["vda"].extend(bytes(8 * MiB))
    model.write("vda", 20 * MiB, MiB, 0x12)
    result = vm_backup(hozon, vm)
    assert disk_modes(result) == {"vda": "full"}
    assert any("resized" in note for note in result["notes"]), result["notes"]
    assert_restores(hozon, tmp_path, result["snapshot"]["id"], model.copy())


def test_after_a_qemu_crash_the_next_backup_is_full(hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", 0, MiB, 0x21)
    vm_backup(hozon, vm)
    model.write("vda", 2 * MiB, MiB, 0x22)
    with vm.monitor() as qmp:  # the data is durable (a guest's fsync); the bitmap is saved only on a clean exit
        assert qmp.hmp('qemu-io -d vda/virtio-backend "flush"') == ""
    vm.kill()  # so after this crash QEMU finds the persistent bitmap marked in-use: inconsistent
    restarted = subprocess.Popen(vm.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not vm.hozon_qmp_path.exists() or not vm.qmp_path.exists():
            assert time.monotonic() < deadline and restarted.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        result = vm_backup(hozon, vm)
        assert disk_modes(result) == {"vda": "full"}
        assert any("inconsistent" in note or "no change tracking" in note for note in result["notes"]), result
        assert_restores(hozon, tmp_path, result["snapshot"]["id"], model.copy())
    finally:
        restarted.kill()
        restarted.wait()


def test_a_pruned_parent_makes_the_next_backup_full(hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", 0, MiB, 0x31)
    vm_backup(hozon, vm)
    model.write("vda", 3 * MiB, MiB, 0x32)
    second = vm_backup(hozon, vm)
    hozon("forget", second["snapshot"]["id"][:8], "--prune")
    model.write("vda", 5 * MiB, MiB, 0x33)
    result = vm_backup(hozon, vm)
    assert disk_modes(result) == {"vda": "full"}
    assert any("pruned" in note for note in result["notes"]), result["notes"]
    assert_restores(hozon, tmp_path, result["snapshot"]["id"], model.copy())


def test_a_vm_that_quits_mid_backup_leaves_no_snapshot(hozon: Hozon, qemu_vm: QemuVmFactory,
                                                        tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "1G")])
    model = Model(vm, {"vda": 1024 * MiB})
    for i in range(0, 1024, 64):
        model.write("vda", i * MiB, 32 * MiB, 0x40 + i % 7)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = hozon.popen("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "web1", "--scratch", str(scratch))
    deadline = time.monotonic() + 60
    while not list(scratch.glob("hozon-*/*.fleece.qcow2")):  # the point in time exists: reading begins
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    vm.kill()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and err.startswith("hozon: error:"), err
    assert json.loads(hozon("snapshots", "--json").stdout) == []
    assert hozon("check").returncode == 0


@pytest.mark.parametrize("mode", ["full"])
def test_mode_full_reads_everything_again(hozon: Hozon, qemu_vm: QemuVmFactory, mode: str) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", 0, 2 * MiB, 0x51)
    vm_backup(hozon, vm)
    result = vm_backup(hozon, vm, "--mode", mode)
    assert disk_modes(result) == {"vda": "full"}
    assert result["snapshot"]["summary"]["bytes_read"] == 2 * MiB
    assert result["snapshot"]["summary"]["data_added"] == 0  # deduplicated against the first


def test_images_of_a_shut_off_vm_are_backed_up_and_a_running_one_is_refused(
        hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    Model(vm, {"vda": 16 * MiB}).write("vda", 2 * MiB, MiB, 0x61)
    running = hozon("vm", "backup", "--image", str(vm.disks["vda"].path), "--name", "off1", check=False)
    assert running.returncode == 1 and "Traceback" not in running.stderr
    assert "--qmp" in running.stderr  # the hint says how to back up a running VM
    vm.stop()
    result = json.loads(hozon("vm", "backup", "--image", str(vm.disks["vda"].path), "--name", "off1",
                              "--json").stdout)
    assert disk_modes(result) == {"vda": "full"} and result["snapshot"]["extra"]["source"] == "image"
    expected = bytearray(16 * MiB)
    expected[2 * MiB : 3 * MiB] = b"\x61" * MiB
    assert_restores(hozon, tmp_path, result["snapshot"]["id"], {"vda": bytes(expected)})
