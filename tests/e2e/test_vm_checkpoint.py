"""hozon vm checkpoint: a real guest's disks and running state, kept, resumed and exported.

The guest (tests/guest.py) counts on its serial console (``TICK n``, five a second) and keeps a
marker string in memory that appears in no file it was built from. A checkpoint taken while it
counts must resume with the count going on from the instant of the checkpoint — not from zero,
and without a boot — and its memory export must be an ELF core holding the marker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from tests import guest
from tests.conftest import Hozon
from tests.e2e.conftest import NEEDS_GUEST, QemuVm, QemuVmFactory

pytestmark = [
    pytest.mark.timeout(300),
    *NEEDS_GUEST,
]

MARKER = "HOZON-MEMORY-MARKER-42"
COUNTER = """
m="HOZON-MEMORY""-MARKER-$((6*7))"
echo "$m" > /tmp/marker
echo CHECKPOINT-DISK-MARK | dd of=/dev/vda bs=512 count=1 conv=notrunc,sync oflag=direct 2>/dev/null
i=0
while true; do
    i=$((i+1))
    echo "TICK $i"
    usleep 200000
done
"""
MEMORY_MIB = 128
MAC = "52:54:00:12:34:56"


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^TICK (\d+)\s*$", text.replace("\r", ""), re.MULTILINE)]


def counting_guest(qemu_vm: QemuVmFactory, tmp_path: Path) -> tuple[QemuVm, Path]:
    initrd = guest.build_initramfs(COUNTER)
    nic = ["-netdev", "user,id=net0", "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={MAC}"]
    vm = qemu_vm(disks=[("vda", "16M")], extra_args=[*guest.boot_args(initrd), *nic], paused=False, serial=True,
                 memory=MEMORY_MIB)
    assert vm.serial_log is not None
    guest.wait_for_serial(vm.serial_log, "TICK 3", timeout=90, alive=vm.running)
    config = tmp_path / "vm.cmdline"
    config.write_text(shlex.join(vm.args) + "\n")
    return vm, config


def checkpoint(hozon: Hozon, vm: QemuVm, config: Path) -> tuple[dict[str, Any], int, int]:
    """Take a checkpoint; with the last tick printed before the command and the first one after it."""
    assert vm.serial_log is not None
    before = max(ticks(vm.serial_log.read_text(errors="replace")))
    run = hozon("vm", "checkpoint", "--qmp", str(vm.hozon_qmp_path), "--name", "counter", "--vm-config", str(config),
                "--json", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    seen = len(ticks(vm.serial_log.read_text(errors="replace")))
    deadline = time.monotonic() + 30
    while len(ticks(vm.serial_log.read_text(errors="replace"))) == seen:
        assert time.monotonic() < deadline, "the guest stopped counting after the checkpoint"
        time.sleep(0.05)
    after = ticks(vm.serial_log.read_text(errors="replace"))[seen]
    result: dict[str, Any] = json.loads(run.stdout)
    return result["snapshot"], before, after


def resumed_pid(output: str) -> int:
    found = re.search(r"QEMU pid (\d+)", output)
    assert found, output
    return int(found.group(1))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_checkpoint_resumes_where_the_guest_was_and_exports_its_memory(
        hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm, config = counting_guest(qemu_vm, tmp_path)

    first, before, after = checkpoint(hozon, vm, config)
    assert first["kind"] == "checkpoint" and first["extra"]["vm"] == "counter"
    state, summary = first["extra"]["state"], first["summary"]
    assert state["format"] == "qemu-migration" and state["size"] == summary["state_bytes"] > 0
    assert state["ram_bytes"] >= MEMORY_MIB << 20  # guest RAM and the ROMs QEMU keeps in RAM blocks
    assert first["extra"]["machine"].startswith("pc-q35-") and first["extra"]["memory_bytes"] == MEMORY_MIB << 20
    assert 0 < summary["pause_ms"] < 2000, summary  # paused for the instant only, not for the stream
    assert first["extra"]["interfaces"] == [{"name": "nic0", "mac": MAC}]
    assert first["extra"]["netdevs"] == ["user,id=net0"] and first["extra"]["qemu_version"]
    with vm.monitor() as qmp:
        status = qmp.execute("query-status")
        assert status["status"] == "running", status
        assert qmp.execute("query-block-jobs") == []
        migrate = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
        assert migrate["background-snapshot"] is False  # turned off again for the VM's next real migration

    second, _, _ = checkpoint(hozon, vm, config)
    added = second["summary"]["data_added"]
    fraction = added / second["summary"]["state_bytes"]
    print(f"\nfirst checkpoint: {first['summary']['state_bytes']} state bytes, {first['summary']['data_added']} added; "
          f"second: {added} added ({fraction:.1%} of its state); paused {first['summary']['pause_ms']} ms and "
          f"{second['summary']['pause_ms']} ms")
    assert fraction < 0.5, second["summary"]  # an idle guest: most of its memory is stored already
    assert second["extra"]["disks"][0]["mode"] == "incremental"

    changed = json.loads(hozon("diff", first["id"], second["id"], "--json").stdout)
    assert [d["name"] for d in changed["disks"]] == ["vda"]
    memory = changed["memory"]
    assert memory["size"] == second["summary"]["state_bytes"]
    assert 0 < memory["changed_bytes"] < memory["size"]  # the guest ran on between them, but little changed
    assert "of state changed" in hozon("diff", first["id"], second["id"]).stdout

    checked = hozon("check", "--read-data", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = json.loads(hozon("snapshots", "--json").stdout)
    assert [s["kind"] for s in listed] == ["checkpoint", "checkpoint"]

    # The memory, as an ELF core of the guest's physical memory, from a copy that never runs.
    core = tmp_path / "memory.elf"
    out = hozon("vm", "memory", first["id"][:8], "--to", str(core))
    assert "ELF core" in out.stdout
    data = core.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    assert struct.unpack_from("<H", data, 16)[0] == 4  # e_type ET_CORE
    assert MEMORY_MIB << 20 <= len(data) < (MEMORY_MIB << 20) + (4 << 20)
    assert MARKER.encode() in data
    assert vm.running()  # the original was never touched
    assert not list(tmp_path.glob("memory.elf.partial"))

    # The original dies; the first checkpoint comes back and counts on from where it was.
    vm.kill()
    assert vm.serial_log is not None
    vm.serial_log.unlink()
    target = tmp_path / "resumed"
    run = hozon("vm", "checkpoint", "restore", first["id"], "--to", str(target), "--start", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    pid = resumed_pid(run.stdout)
    try:
        guest.wait_for_serial(vm.serial_log, "TICK", timeout=60, alive=lambda: Path(f"/proc/{pid}").exists())
        time.sleep(1)
        resumed = vm.serial_log.read_text(errors="replace")
        counted = ticks(resumed)
        assert counted, resumed
        assert before <= counted[0] - 1 <= after, (before, counted[:3], after)  # on from the instant
        assert counted == list(range(counted[0], counted[0] + len(counted)))
        assert guest.READY_MARKER not in resumed and "Linux version" not in resumed  # no boot
    finally:
        kill(pid)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["vda.qcow2", "vmstate", f"checkpoint-{first['id'][:8]}.json", "qemu.log"])
    assert (target / "vda.qcow2").exists()

    # --paused: the state is loaded, the guest waits for 'cont'.
    vm.serial_log.unlink(missing_ok=True)
    run = hozon("vm", "checkpoint", "restore", second["id"], "--to", str(tmp_path / "paused"), "--start", "--paused")
    pid = resumed_pid(run.stdout)
    try:
        assert "paused" in run.stdout
        time.sleep(1.5)
        assert ticks(vm.serial_log.read_text(errors="replace") if vm.serial_log.exists() else "") == []
        with vm.monitor() as qmp:  # the saved command line's own monitor, as it was
            assert qmp.execute("query-status")["status"] == "paused"
            qmp.execute("cont")
        guest.wait_for_serial(vm.serial_log, "TICK", timeout=60, alive=lambda: Path(f"/proc/{pid}").exists())
    finally:
        kill(pid)

    # The disk came back as it was at the instant: the guest's mark is on it.
    disk = tmp_path / "disk.raw"
    hozon("vm", "restore", first["id"], "--disk", "vda", "--to", str(disk), "--format", "raw")
    assert disk.read_bytes()[:20] == b"CHECKPOINT-DISK-MARK"

    # Retention treats checkpoints like any snapshot; what is kept still restores.
    hozon("forget", "--keep-last", "1", "--prune")
    assert [s["id"] for s in json.loads(hozon("snapshots", "--json").stdout)] == [second["id"]]
    checked = hozon("check", "--read-data", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    printed = hozon("vm", "checkpoint", "restore", "latest:counter", "--to", str(tmp_path / "kept")).stdout
    assert (tmp_path / "kept" / "vmstate").stat().st_size == second["summary"]["state_bytes"]
    command = shlex.split(printed.split("resume the VM with:\n", 1)[1])
    assert command[-2:] == ["-incoming", f"exec:cat {tmp_path / 'kept' / 'vmstate'}"]
    assert f"file.filename={tmp_path / 'kept' / 'vda.qcow2'}" in " ".join(command)


def test_image_diff_names_the_changed_regions_and_refusals_are_one_clear_sentence(
        hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")])

    def backup() -> dict[str, Any]:
        run = hozon("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "plain", "--json")
        snap: dict[str, Any] = json.loads(run.stdout)["snapshot"]
        return snap

    def write(offset: int, length: int) -> None:
        with vm.monitor() as qmp:
            assert "error" not in qmp.hmp(f'qemu-io -d vda/virtio-backend "write -P 0x5a {offset} {length}"')

    write(0, 4096)
    first = backup()
    write(4 << 20, 1 << 20)  # one whole chunk
    write((10 << 20) + 4096, 65536)  # inside one chunk
    write(11 << 20, 4096)  # the next chunk: one region with the previous
    second = backup()
    changed = json.loads(hozon("diff", first["id"], second["id"], "--json").stdout)
    assert changed["memory"] is None
    assert changed["disks"] == [{"name": "vda", "status": "changed", "size": 16 << 20, "chunk_size": 1 << 20,
                                 "changed_bytes": 3 << 20,
                                 "regions": [{"offset": 4 << 20, "length": 1 << 20},
                                             {"offset": 10 << 20, "length": 2 << 20}]}]
    text = hozon("diff", first["id"], second["id"]).stdout
    assert "disk vda: changed, 3.00 MiB of 16.00 MiB in 2 region(s)" in text, text
    assert "unchanged" in hozon("diff", second["id"], second["id"]).stdout

    # A VM that was never started (-S) has no state to keep; QEMU 7.2 would abort on trying.
    unstarted = hozon("vm", "checkpoint", "--qmp", str(vm.hozon_qmp_path), "--name", "plain", check=False)
    assert unstarted.returncode == 1 and "the VM has not been started yet" in unstarted.stderr, unstarted.stderr
    with vm.monitor() as qmp:
        assert qmp.execute("query-status")["status"] == "prelaunch"
        assert qmp.execute("query-block-jobs") == []

    refused = hozon("vm", "checkpoint", "restore", second["id"], "--to", str(tmp_path / "r"), check=False)
    assert refused.returncode == 2 and "is a vm snapshot, not a checkpoint" in refused.stderr, refused.stderr
    refused_memory = hozon("vm", "memory", second["id"], "--to", str(tmp_path / "m.elf"), check=False)
    assert refused_memory.returncode == 2 and "not a checkpoint" in refused_memory.stderr
    no_vm = hozon("vm", "checkpoint", check=False)
    assert no_vm.returncode == 2 and "say which VM to checkpoint" in no_vm.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "file").write_text("a file snapshot\n")
    hozon("backup", str(tmp_path / "data"))
    mixed = hozon("diff", first["id"], "latest", check=False)
    assert mixed.returncode == 2 and "is a file snapshot" in mixed.stderr, mixed.stderr
    for run in (unstarted, refused, refused_memory, no_vm, mixed):
        assert "Traceback" not in run.stderr


def test_a_checkpoint_killed_mid_stream_leaves_the_vm_running_and_clean(
        hozon: Hozon, qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm, config = counting_guest(qemu_vm, tmp_path)
    first, _, _ = checkpoint(hozon, vm, config)

    proc = hozon.popen("vm", "checkpoint", "--qmp", str(vm.hozon_qmp_path), "--name", "counter",
                       "--vm-config", str(config))
    try:
        with vm.monitor() as qmp:  # kill Hozon while the guest's memory streams into it
            deadline = time.monotonic() + 60
            while qmp.execute("query-migrate").get("status") != "active":
                assert proc.poll() is None, "the checkpoint ended before it could be killed"
                assert time.monotonic() < deadline, "the state never started streaming"
                time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    with vm.monitor() as qmp:  # the guardian undoes what the killed Hozon left, within seconds
        deadline = time.monotonic() + 30
        while True:
            jobs, exports = qmp.execute("query-block-jobs"), qmp.execute("query-block-exports")
            nodes = [n["node-name"] for n in qmp.execute("query-named-block-nodes") if "hozon" in n["node-name"]]
            caps = {c["capability"]: c["state"] for c in qmp.execute("query-migrate-capabilities")}
            status = qmp.execute("query-status")["status"]
            migration = qmp.execute("query-migrate").get("status")
            if not (jobs or exports or nodes) and not caps["background-snapshot"] and status == "running" and \
                    migration in ("completed", "failed", "cancelled"):  # the guardian drained the stream
                break
            assert time.monotonic() < deadline, (jobs, exports, nodes, caps, status, migration)
            time.sleep(0.2)
    assert vm.serial_log is not None
    counted = len(ticks(vm.serial_log.read_text(errors="replace")))
    guest.wait_for_serial(vm.serial_log, f"TICK {counted + 2}", timeout=30, alive=vm.running)  # it runs on

    listed = json.loads(hozon("snapshots", "--json").stdout)
    assert [s["id"] for s in listed] == [first["id"]]  # no partial checkpoint
    checked = hozon("check", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again, _, _ = checkpoint(hozon, vm, config)  # and the next one works, its disk still incremental
    assert again["extra"]["disks"][0]["mode"] == "incremental"
