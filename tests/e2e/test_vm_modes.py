"""``vm backup --mode``: a choice the parser checks for every source, and notes that say only what happened.

An incremental that became full says why in one line; leftovers in QEMU are reported only when
there were some; the bitmap a full backup supersedes goes quietly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.conftest import Hozon
from tests.e2e.test_vm_backup import Model, disk_modes
from tests.e2e.test_vm_failures import REMOVED_NOTE, block_state, snapshot_bitmaps, vm_backup

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVmFactory

MiB = 1 << 20

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
        reason="needs qemu-system-x86_64 and qemu-img (Debian qemu-system-x86, qemu-utils); CI installs them",
    ),
]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A shut-off VM's disk: a raw image with one MiB of data."""
    path = tmp_path / "vda.raw"
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"\x5a" * MiB)
    return path


@pytest.mark.parametrize("source", [["--image", "IMAGE", "--name", "off1"], ["--qmp", "/nonexistent.qmp"],
                                    ["--libvirt", "nosuchdomain"]])
def test_an_unknown_mode_is_refused_by_the_parser_for_every_source(hozon: Hozon, image: Path,
                                                                   source: list[str]) -> None:
    args = [str(image) if a == "IMAGE" else a for a in source]
    result = hozon("vm", "backup", *args, "--mode", "bogus", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "bogus" in result.stderr and "incremental" in result.stderr  # names the choices
    assert json.loads(hozon("snapshots", "--json").stdout) == []


def test_checkpoint_mode_is_checked_by_the_parser_too(hozon: Hozon) -> None:
    result = hozon("vm", "checkpoint", "--qmp", "/nonexistent.qmp", "--mode", "bogus", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "bogus" in result.stderr


def test_images_asked_for_incrementally_are_read_fully_and_it_says_why(hozon: Hozon, image: Path) -> None:
    first = hozon("vm", "backup", "--image", str(image), "--name", "off1", "--mode", "incremental")
    notes = [line for line in first.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "vda" in notes[0] and "shut-off" in notes[0], first.stderr
    again = json.loads(hozon("vm", "backup", "--image", str(image), "--name", "off1", "--mode", "incremental",
                             "--json").stdout)
    assert disk_modes(again) == {"vda": "full"}
    assert len(again["notes"]) == 1 and "shut-off" in again["notes"][0], again["notes"]
    full = json.loads(hozon("vm", "backup", "--image", str(image), "--name", "off1", "--mode", "full",
                            "--json").stdout)
    assert full["notes"] == []  # a full read was asked for: nothing to explain


def test_mode_incremental_without_an_earlier_snapshot_says_why_in_one_line(hozon: Hozon,
                                                                            qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm(disks=[("vda", "16M"), ("vdb", "16M")])
    Model(vm, {"vda": 16 * MiB, "vdb": 16 * MiB}).write("vda", 0, MiB, 0x21)
    result = hozon("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "web1", "--mode", "incremental")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.stderr
    assert "vda" in notes[0] and "vdb" in notes[0] and "no earlier snapshot" in notes[0], notes


def test_a_full_backup_after_a_clean_run_reports_no_leftovers(hozon: Hozon, qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", 0, MiB, 0x31)
    vm_backup(hozon, vm)
    full = vm_backup(hozon, vm, "--mode", "full")
    assert disk_modes(full) == {"vda": "full"} and full["notes"] == [], full["notes"]
    assert block_state(vm).bitmaps == snapshot_bitmaps(full)  # the superseded bitmap went, quietly
    model.write("vda", 4 * MiB, MiB, 0x32)
    after = vm_backup(hozon, vm)
    assert disk_modes(after) == {"vda": "incremental"} and after["notes"] == [], after["notes"]
    assert after["snapshot"]["summary"]["bytes_read"] == MiB
    assert block_state(vm).bitmaps == snapshot_bitmaps(after)


def test_real_leftovers_are_still_reported(hozon: Hozon, qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])
    Model(vm, {"vda": 16 * MiB}).write("vda", 0, MiB, 0x41)
    first = vm_backup(hozon, vm)
    config = json.loads(hozon("cat", "config").stdout)
    stray = f"hozon-{config['id'][:12]}-deadbeef"  # as a backup killed before its guardian ran leaves it
    with vm.monitor() as qmp:
        qmp.execute("block-dirty-bitmap-add", {"node": "vda-format", "name": stray, "persistent": True})
    second = vm_backup(hozon, vm)
    removed = [note for note in second["notes"] if note.startswith(REMOVED_NOTE)]
    assert len(removed) == 1 and stray in removed[0], second["notes"]
    assert disk_modes(second) == {"vda": "incremental"}  # the chain the first snapshot started is intact
    assert block_state(vm).bitmaps == snapshot_bitmaps(second)
    assert first["snapshot"]["id"] != second["snapshot"]["id"]

