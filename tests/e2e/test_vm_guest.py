"""Image backups of a real Linux guest that writes to its disk while Hozon backs it up.

The tiny test guest (tests/guest.py) runs a sequential writer: record ``i`` (a 4 KiB block of
``"REC <i>\\n"`` repeated) goes to ``/dev/vda`` with ``O_DIRECT``, one ``dd`` after the other, and
``WROTE <i>`` is printed on the serial console once it is on the disk. Whatever instant a backup
freezes, the disk then holds records ``0..K`` and nothing else of the writer's: a point-in-time
copy must restore to exactly such a clean prefix, never to a torn or missing record with later
ones present.

The records go round-robin to 16 slots 32 MiB apart (record ``i`` to slot ``i % 16``), with
24 MiB of filler after each slot's records. Hozon reads a disk in offset order, so the slots are
read at moments a good fraction of a second apart, while the guest writes a record every few tens
of milliseconds: a backup that read the live disk instead of one frozen instant finds later slots
ahead of earlier ones (checked by hand: with the live disk node exported instead of the fleece
node, this test failed in every run). The serial console also brackets the instant: it lies between
the start and the end of the ``hozon vm backup`` command.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests import guest
from tests.conftest import Hozon
from tests.e2e.conftest import NEEDS_GUEST

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVm, QemuVmFactory

MiB = 1 << 20
RECORD = 4096
SLOTS = 16
STRIDE = 32 * MiB  # slot s: records from s * STRIDE, filler from s * STRIDE + FILLER_AT
SLOT_RECORDS = 2 * MiB // RECORD  # records a slot has room for
FILLER_AT, FILLER_SIZE = 4 * MiB, 24 * MiB
DISK_SIZE = SLOTS * STRIDE
MAX_RECORDS = SLOTS * SLOT_RECORDS

pytestmark = [
    pytest.mark.timeout(240),
    *NEEDS_GUEST,
]

# Ten doublings of "REC <i>\n" (6 bytes or more) fill more than 4 KiB; dd takes the first 4 KiB.
WRITER = f"""\
i=0
while [ $i -lt {MAX_RECORDS} ]; do
    r="REC $i
"
    for _ in 1 2 3 4 5 6 7 8 9 10; do r="$r$r"; done
    printf '%s' "$r" > /tmp/rec
    block=$(( (i % {SLOTS}) * {STRIDE // RECORD} + i / {SLOTS} ))
    if ! dd if=/tmp/rec of=/dev/vda bs={RECORD} count=1 seek=$block conv=notrunc oflag=direct 2>/tmp/dd.err
    then
        echo "WRITE-FAILED $i: $(cat /tmp/dd.err)"
        exit 1
    fi
    echo "WROTE $i"
    i=$((i+1))
done
echo "WRITER-DONE"
sleep 600
"""


def record(i: int) -> bytes:
    return (f"REC {i}\n".encode() * RECORD)[:RECORD]


def filler(slot: int) -> bytes:
    return bytes([0x40 + slot]) * FILLER_SIZE


def last_written(vm: QemuVm) -> int:
    """The last record the guest reported on the disk (-1: none yet)."""
    assert vm.serial_log is not None
    text = vm.serial_log.read_text(errors="replace")
    assert "WRITE-FAILED" not in text and "WRITER-DONE" not in text, text[-2000:]
    found = re.findall(r"WROTE (\d+)", text)
    return int(found[-1]) if found else -1


def wait_written(vm: QemuVm, index: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while last_written(vm) < index:
        assert vm.running(), vm.output()
        assert time.monotonic() < deadline, f"the guest did not write record {index} within {timeout:g} s"
        time.sleep(0.05)


def clean_prefix(image: Path, what: str) -> int:
    """K such that the raw ``image`` holds records 0..K, the filler, and zeroes elsewhere; fails otherwise."""
    assert image.stat().st_size == DISK_SIZE, what
    counts = []
    with image.open("rb") as f:
        for slot in range(SLOTS):
            region = f.read(STRIDE)
            n = 0
            while n < SLOT_RECORDS and region[n * RECORD : (n + 1) * RECORD] == record(n * SLOTS + slot):
                n += 1
            rest = region[n * RECORD : FILLER_AT]
            if rest != bytes(len(rest)):
                block = n + next(i for i, byte in enumerate(rest) if byte) // RECORD
                raise AssertionError(f"{what}: slot {slot} holds {n} records, then a torn or misplaced block "
                                     f"{region[block * RECORD : block * RECORD + 24]!r} at its block {block}")
            assert region[FILLER_AT : FILLER_AT + FILLER_SIZE] == filler(slot), f"{what}: filler of slot {slot}"
            assert region[FILLER_AT + FILLER_SIZE :] == bytes(STRIDE - FILLER_AT - FILLER_SIZE), what
            counts.append(n)
    k = sum(counts) - 1
    expected = [len(range(slot, k + 1, SLOTS)) for slot in range(SLOTS)]
    assert counts == expected, (f"{what} is not one instant of the writer: records per slot {counts}; "
                                f"records 0..{k} would be {expected}")
    return k


def vm_backup(hozon: Hozon, vm: QemuVm) -> dict[str, Any]:
    run = hozon("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "guest1", "--json", check=False)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def restore_raw(hozon: Hozon, snapshot_id: str, target: Path) -> Path:
    run = hozon("vm", "restore", snapshot_id[:8], "--to", str(target), "--format", "raw", check=False)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    return target / "vda.raw"


def same_records(a: Path, b: Path, k: int) -> bool:
    """Records 0..k are byte for byte the same in both raw images."""
    with a.open("rb") as fa, b.open("rb") as fb:
        for slot in range(SLOTS):
            length = len(range(slot, k + 1, SLOTS)) * RECORD
            fa.seek(slot * STRIDE)
            fb.seek(slot * STRIDE)
            if fa.read(length) != fb.read(length):
                return False
    return True


def test_backups_of_a_guest_writing_its_disk_are_each_one_instant(hozon: Hozon, qemu_vm: QemuVmFactory,
                                                                  tmp_path: Path) -> None:
    initrd = guest.build_initramfs(WRITER)
    vm = qemu_vm(disks=[("vda", DISK_SIZE)], extra_args=guest.boot_args(initrd), paused=True, serial=True,
                 memory=256)
    with vm.monitor() as qmp:
        for slot in range(SLOTS):
            out = qmp.hmp(f'qemu-io -d vda/virtio-backend "write -P {0x40 + slot} '
                          f'{slot * STRIDE + FILLER_AT} {FILLER_SIZE}"')
            assert "error" not in out.lower(), out
        qmp.execute("cont")
    wait_written(vm, 2 * SLOTS)

    windows: list[tuple[int, int]] = []
    results: list[dict[str, Any]] = []
    for _ in range(2):
        before = last_written(vm)
        results.append(vm_backup(hozon, vm))
        after = last_written(vm)
        windows.append((before, after))
        wait_written(vm, after + 2 * SLOTS)  # the guest goes on writing between the backups
    with vm.monitor() as qmp:
        qmp.execute("quit")
    assert vm.wait(30) == 0, vm.output()
    written = last_written(vm)

    first, second = (r["snapshot"] for r in results)
    final = tmp_path / "final.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(vm.disks["vda"].path), str(final)],
                   check=True, capture_output=True, timeout=60)
    k_final = clean_prefix(final, "the disk after the guest stopped")
    assert k_final >= written  # every record the guest reported is on the disk

    prefixes = []
    for snap, (before, after) in zip((first, second), windows, strict=True):
        restored = restore_raw(hozon, snap["id"], tmp_path / f"restore-{snap['short_id']}")
        k = clean_prefix(restored, f"snapshot {snap['short_id']}")
        # The instant lies within the backup command: every record reported before it started is
        # there, and at most the one being written when it ended is beyond what was reported then.
        assert before <= k <= after + 1, (before, k, after)
        assert same_records(restored, final, k)
        prefixes.append(k)
    k1, k2 = prefixes
    assert k1 < k2 <= k_final

    assert [d["mode"] for d in first["extra"]["disks"]] == ["full"]
    assert first["summary"]["bytes_read"] >= SLOTS * (FILLER_SIZE + MiB)
    assert [d["mode"] for d in second["extra"]["disks"]] == ["incremental"], results[1]["notes"]
    assert second["parent"] == first["id"]
    assert second["summary"]["bytes_read"] <= 2 * SLOTS * MiB <= DISK_SIZE // 8, second["summary"]
    print(f"\nrecords in the first snapshot: {k1 + 1}, the second: {k2 + 1}, on the disk at the end: {k_final + 1} "
          f"(written during the backups: {windows[0][1] - windows[0][0]}, {windows[1][1] - windows[1][0]}); "
          f"the second read {second['summary']['bytes_read'] / MiB:.0f} MiB; "
          f"VM I/O paused {first['summary']['pause_ms']} / {second['summary']['pause_ms']} ms")
