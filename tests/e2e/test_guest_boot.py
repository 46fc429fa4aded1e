"""The tiny test guest (tests/guest.py) boots under TCG, runs a test's script and writes its virtio disk.

The second test is the shape image-level backup tests take: a paused VM, a dirty bitmap added over
QMP, the guest let run until it powers off (``-action shutdown=pause`` keeps QEMU up), then what
the bitmap recorded is checked through QMP.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests import guest
from tests.e2e.conftest import NEEDS_GUEST

if TYPE_CHECKING:
    from conftest import QemuVm, QemuVmFactory

KiB = 1024

pytestmark = [
    pytest.mark.timeout(180),
    *NEEDS_GUEST,
]


def read_image(vm: QemuVm, disk: str, offset: int, length: int, tmp_path: Path) -> bytes:
    """Bytes of a disk as the guest left them (QEMU must have exited: it locks its images)."""
    out = tmp_path / "read.raw"
    subprocess.run(["qemu-img", "dd", "-f", vm.disks[disk].format, "-O", "raw", "bs=512",
                    f"skip={offset // 512}", f"count={-(-length // 512)}", f"if={vm.disks[disk].path}", f"of={out}"],
                   check=True, capture_output=True, timeout=60)
    return out.read_bytes()[:length]


def test_the_guest_boots_runs_its_script_and_writes_its_disk(qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    initrd = guest.build_initramfs(
        "echo HOZON-TEST-MARKER\n"
        "i=0\n"
        'while [ $i -lt 3 ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done\n'
        "echo HELLO | dd of=/dev/vda bs=512 seek=0 conv=notrunc\n"
        "sync\n"
    )
    started = time.monotonic()
    vm = qemu_vm(disks=[("vda", "16M")], extra_args=guest.boot_args(initrd), paused=False, serial=True, memory=256)
    assert vm.serial_log is not None
    boot = guest.wait_for_serial(vm.serial_log, "HOZON-TEST-MARKER", timeout=60, alive=vm.running)
    assert vm.wait(60) == 0, vm.output()  # the guest powered off, and -no-reboot let QEMU exit
    took = time.monotonic() - started
    serial = vm.serial_log.read_text()
    assert "tick 0\ntick 1\ntick 2\n" in serial.replace("\r\n", "\n")
    assert f"{guest.EXIT_MARKER} 0" in serial and "insmod" not in serial, serial
    assert read_image(vm, "vda", 0, 8, tmp_path) == b"HELLO\n\0\0"
    print(f"guest: script running {boot:.1f} s after QEMU started; powered off after {took:.1f} s")


def test_guest_writes_are_recorded_by_a_dirty_bitmap_added_before_boot(qemu_vm: QemuVmFactory,
                                                                       tmp_path: Path) -> None:
    initrd = guest.build_initramfs(
        "dd if=/dev/urandom of=/dev/vda bs=65536 seek=16 count=2 conv=notrunc 2>/dev/null\n"  # 1 MiB + 128 KiB
        "dd if=/dev/vda of=/dev/null bs=65536 skip=64 count=4 2>/dev/null\n"  # reads mark nothing
        "sync\n"
    )
    vm = qemu_vm(disks=[("vda", "16M")], extra_args=[*guest.boot_args(initrd), "-action", "shutdown=pause"],
                 paused=True, serial=True, memory=256)
    node = vm.disks["vda"].node
    with vm.monitor() as client:
        client.execute("block-dirty-bitmap-add", {"node": node, "name": "hozon-0", "persistent": True})
        client.execute("cont")
        shutdown = client.wait_event("SHUTDOWN", timeout=90)
        assert shutdown.data["guest"] is True, vm.serial_log.read_text() if vm.serial_log else ""
        assert client.execute("query-status")["status"] == "shutdown"  # paused, not gone
        nodes = {n["node-name"]: n for n in client.execute("query-named-block-nodes", {"flat": True})}
        bitmap = {b["name"]: b for b in nodes[node]["dirty-bitmaps"]}["hozon-0"]
        assert bitmap["count"] == 128 * KiB
        client.execute("quit")
    assert vm.wait(30) == 0
    assert read_image(vm, "vda", 1024 * KiB, 128 * KiB, tmp_path) != bytes(128 * KiB)
