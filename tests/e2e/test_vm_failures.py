"""Image-level VM backups when things go wrong: a killed Hozon, a full repository, odd command lines.

Every case runs the real ``hozon`` command against a real QEMU (``-S``, no guest code; writes come
through the virtio device with HMP ``qemu-io``) and checks what a user would: the exit code, one
clear message and no traceback, a repository that lists and checks, a VM that Hozon left as it
found it (no block jobs, fleece nodes or NBD exports; one change-tracking bitmap per disk), and a
next backup that works, stays incremental when it can, and restores to the right bytes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.conftest import Hozon, Run
from tests.e2e.test_vm_backup import Model, assert_restores, disk_modes

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVm, QemuVmFactory

MiB = 1 << 20
REMOVED_NOTE = "removed what an interrupted backup left in QEMU"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="needs qemu-system-x86_64 and qemu-img (Debian qemu-system-x86, qemu-utils); CI installs them",
    ),
]


# -- helpers ----------------------------------------------------------------------------------------
def run(hozon: Hozon, *args: str) -> Run:
    result = hozon(*args, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def vm_backup(hozon: Hozon, vm: QemuVm, *args: str, name: str | None = "web1") -> dict[str, Any]:
    named = ("--name", name) if name else ()
    result = run(hozon, "vm", "backup", "--qmp", str(vm.hozon_qmp_path), *named, "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def snapshot_ids(hozon: Hozon) -> list[str]:
    result = run(hozon, "snapshots", "--json")
    assert result.returncode == 0, result.stderr
    return [s["id"] for s in json.loads(result.stdout)]


def check_passes(hozon: Hozon) -> None:
    result = run(hozon, "check")
    assert result.returncode == 0, f"hozon check failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


@dataclass
class QemuBlockState:
    jobs: list[str]
    exports: list[str]
    hozon_nodes: list[str]  # fleece and scratch nodes
    bitmaps: dict[str, list[str]]  # disk → Hozon's bitmaps on its format node

    @property
    def clean(self) -> bool:
        return not (self.jobs or self.exports or self.hozon_nodes)


def block_state(vm: QemuVm) -> QemuBlockState:
    with vm.monitor() as qmp:
        jobs = [str(j.get("device")) for j in qmp.execute("query-block-jobs")]
        exports = [str(e.get("id")) for e in qmp.execute("query-block-exports")]
        nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    hozon_nodes = sorted(n for n in nodes if n.startswith(("hozon-fleece-", "hozon-scratch-")))
    bitmaps = {name: sorted(str(b["name"]) for b in nodes[disk.node].get("dirty-bitmaps", [])
                            if str(b.get("name", "")).startswith("hozon-"))
               for name, disk in vm.disks.items()}
    return QemuBlockState(jobs, exports, hozon_nodes, bitmaps)


def snapshot_bitmaps(result: dict[str, Any]) -> dict[str, list[str]]:
    """The bitmap each disk's next incremental backup starts from, as the snapshot recorded it."""
    return {d["name"]: [d["bitmap"]] for d in result["snapshot"]["extra"]["disks"]}


def write_random(model: Model, disk: str, offset: int, length: int, tmp_path: Path) -> None:
    """Write incompressible, never repeating data through the device (HMP qemu-io ``write -s FILE``)."""
    source = tmp_path / f"random-{offset}.bin"
    data = os.urandom(length)
    source.write_bytes(data)
    with model.vm.monitor(timeout=60) as qmp:
        out = qmp.hmp(f'qemu-io -d {disk}/virtio-backend "write -s {source} {offset} {length}"', timeout=60)
    assert "error" not in out.lower(), out
    model.disks[disk][offset : offset + length] = data
    source.unlink()


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the backup ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(*args) → a fresh mount point below tmp_path; everything is unmounted afterwards."""
    points: list[Path] = []

    def mount(*args: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        proc = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount here (mount {' '.join(args)}: {proc.stderr.strip()}); needs root and "
                        "loop devices, which CI has")
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            subprocess.run(["umount", "-l", str(point)], check=False)


# -- kill -9 in the middle of a backup ----------------------------------------------------------------
def test_a_killed_backup_is_cleaned_up_by_its_guardian_and_the_chain_survives(hozon: Hozon, qemu_vm: QemuVmFactory,
                                                                            tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "1G")])
    model = Model(vm, {"vda": 1024 * MiB})
    model.write("vda", 0, 4 * MiB, 0x11)
    first = vm_backup(hozon, vm)
    for i in range(0, 1024, 64):  # half the disk changes: the next backup has 512 MiB to read
        model.write("vda", i * MiB, 32 * MiB, 0x40 + i % 7)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = hozon.popen("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "web1", "--scratch", str(scratch))
    try:
        wait_until(lambda: bool(list(scratch.glob("hozon-*/*.fleece.qcow2"))), proc, "the scratch image appeared")
        with vm.monitor() as qmp:  # once the point in time is served, Hozon is reading it
            wait_until(lambda: bool(qmp.execute("query-block-exports")), proc, "the disk was exported")
    finally:
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the backup ended before it was killed:\n{err}"

    # The guardian Hozon started undoes what the killed backup left in QEMU, within seconds.
    deadline = time.monotonic() + 30
    while not (left := block_state(vm)).clean:
        assert time.monotonic() < deadline, f"the killed backup's leftovers stayed in QEMU: {left}"
        time.sleep(0.2)
    assert left.bitmaps == snapshot_bitmaps(first), left  # the last snapshot's bitmap was kept
    assert not list(scratch.rglob("*.fleece.qcow2"))
    assert snapshot_ids(hozon) == [first["snapshot"]["id"]]
    check_passes(hozon)
    locks = json.loads(run(hozon, "list", "locks", "--json").stdout)
    assert [(lock["pid"], lock["stale"]) for lock in locks] == [(proc.pid, True)], locks

    model.write("vda", 900 * MiB, MiB, 0x5A)
    second = vm_backup(hozon, vm, "--scratch", str(scratch))
    assert not [note for note in second["notes"] if note.startswith(REMOVED_NOTE)], second["notes"]
    assert disk_modes(second) == {"vda": "incremental"}, second["notes"]  # the chain survived the kill
    after = block_state(vm)
    assert after.clean, after
    assert after.bitmaps == snapshot_bitmaps(second), after
    assert_restores(hozon, tmp_path, second["snapshot"]["id"], model.copy())

    model.write("vda", 100 * MiB + 4096, 8192, 0x6B)
    third = vm_backup(hozon, vm)
    assert third["notes"] == []
    assert disk_modes(third) == {"vda": "incremental"}
    assert third["snapshot"]["summary"]["bytes_read"] == MiB
    after = block_state(vm)
    assert after.clean and after.bitmaps == snapshot_bitmaps(third), after
    assert_restores(hozon, tmp_path, third["snapshot"]["id"], model.copy())
    assert snapshot_ids(hozon) == [r["snapshot"]["id"] for r in (first, second, third)]
    check_passes(hozon)


# -- the repository's disk fills up -------------------------------------------------------------------
def test_a_full_repository_disk_fails_cleanly_and_the_backup_continues_once_there_is_room(
        hozon: Hozon, qemu_vm: QemuVmFactory, mounted: Callable[..., Path], tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    disk = mounted("-o", "loop", str(image))
    small = copy.copy(hozon)
    small.repo = disk / "repo"
    small.env = {**hozon.env, "HOZON_REPO": str(small.repo)}
    assert run(small, "init").returncode == 0
    ballast = disk / "ballast"
    ballast.write_bytes(os.urandom(48 * MiB))

    vm = qemu_vm(disks=[("vda", "256M")])
    model = Model(vm, {"vda": 256 * MiB})
    model.write("vda", 0, 2 * MiB, 0x21)
    first = vm_backup(small, vm)
    write_random(model, "vda", 8 * MiB, 96 * MiB, tmp_path)  # more than the disk has room for

    failed = run(small, "vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "web1")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space" in errors[0].lower(), failed.stderr
    assert snapshot_ids(small) == [first["snapshot"]["id"]]
    state = block_state(vm)
    assert state.clean and state.bitmaps == snapshot_bitmaps(first), state
    check_passes(small)

    ballast.unlink()  # room for the rest, not for all of it again
    second = vm_backup(small, vm)
    assert disk_modes(second) == {"vda": "incremental"}, second["notes"]
    summary = second["snapshot"]["summary"]
    assert summary["bytes_read"] == 96 * MiB
    assert summary["data_added"] < 96 * MiB, "the chunks stored before the disk filled up were stored again"
    print(f"\nthe backup that filled the disk stored chunks that the next one reused: it added "
          f"{summary['data_added'] / MiB:.0f} MiB of the 96 MiB written")
    state = block_state(vm)
    assert state.clean and state.bitmaps == snapshot_bitmaps(second), state
    assert_restores(small, tmp_path, second["snapshot"]["id"], model.copy())
    check_passes(small)


# -- command lines --------------------------------------------------------------------------------------
def test_mode_incremental_without_a_parent_is_full_and_says_why(hozon: Hozon, qemu_vm: QemuVmFactory,
                                                                 tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")], extra_args=["-name", "db1"])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", MiB, MiB, 0x31)
    first = vm_backup(hozon, vm, "--mode", "incremental", name=None)  # the name comes from QEMU's -name
    assert first["snapshot"]["extra"]["vm"] == "db1"
    assert disk_modes(first) == {"vda": "full"}
    assert any("vda" in note and "first backup" in note for note in first["notes"]), first["notes"]
    assert_restores(hozon, tmp_path, first["snapshot"]["id"], model.copy())

    model.write("vda", 5 * MiB, 4096, 0x32)
    second = vm_backup(hozon, vm, "--mode", "incremental", name=None)
    assert disk_modes(second) == {"vda": "incremental"} and second["notes"] == []
    assert second["snapshot"]["summary"]["bytes_read"] == MiB
    assert_restores(hozon, tmp_path, second["snapshot"]["id"], model.copy())
    assert list(json.loads(run(hozon, "vm", "ls", "--json").stdout)) == ["db1"]


def test_a_vm_without_a_name_needs_name(hozon: Hozon, qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])  # QEMU started without -name
    result = run(hozon, "vm", "backup", "--qmp", str(vm.hozon_qmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("hozon: error:") and "name" in lines[0], result.stderr
    assert any(line.startswith("hint:") and "--name" in line for line in lines), result.stderr
    assert snapshot_ids(hozon) == []
    state = block_state(vm)
    assert state.clean and state.bitmaps == {"vda": []}, state
