"""hozon vm backup --guest-agent: the guest's file systems frozen for the instant, and always thawed.

Real here: QEMU, its virtio-serial device with the agent's port on a ``-chardev socket``, the
guest's Linux kernel with ``virtio_console`` (the port is its ``/dev/vport0p1``), Hozon's client on
the host side of the socket, and the backup itself. Not real: the agent. qemu-ga needs glib and
more than the busybox initramfs of the test guest holds, so the agent is a stand-in written for
these tests — :data:`RESPONDER`, a busybox shell script that serves the agent's protocol on the
port: ``guest-sync-delimited`` (its reply after a 0xFF byte), ``guest-sync``, ``guest-ping``,
``guest-fsfreeze-freeze`` / ``-thaw`` / ``-status``. Its freeze runs ``sync`` and ``fsfreeze`` on
every block-device file system mounted — there are none in this guest (its kernel has no such
file system built in), so it reports 0 frozen, as qemu-ga would.

The freeze and the thaw also leave a mark on the disk, with ``O_DIRECT`` and before the reply:
sector 0 says ``FROZEN <k>``, sector 1 ``THAWED <k>``. A backup whose instant lay inside the freeze
restores with the first mark and without the second; the serial console shows both in order.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests import guest
from tests.conftest import Hozon
from tests.e2e.conftest import NEEDS_GUEST

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVm, QemuVmFactory

FREEZE_TIMEOUT = 10  # Hozon's default

pytestmark = [
    pytest.mark.timeout(120),
    *NEEDS_GUEST,
]

# A stand-in for qemu-ga. Reading the port while no client is connected on the host gives end of
# file, so the loop waits and reads again; one command per line, a 0xFF byte may come first.
RESPONDER = r"""
IGNORE_FREEZE=@IGNORE_FREEZE@
port=
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /dev/vport*p1; do [ -c "$p" ] && port=$p; done
    [ -z "$port" ] && sleep 0.1
    i=$((i+1))
done
if [ -z "$port" ]; then echo "AGENT-NO-PORT"; ls /dev; exit 1; fi
state=thawed
freezes=0
mark() {  # one sector of the disk, past the page cache
    printf '%s\n' "$2" | dd of=/dev/vda bs=512 seek=$1 count=1 conv=notrunc,sync oflag=direct 2>/dev/null
}
filesystems() {  # what qemu-ga would freeze: file systems on block devices
    grep '^/dev/' /proc/mounts | while read -r dev mnt rest; do echo "$mnt"; done
}
exec 3<>"$port"
echo "AGENT-LISTENING $port"
while true; do
    if ! IFS= read -r line <&3; then
        sleep 0.1
        continue
    fi
    id=$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')
    case "$line" in
    *'"guest-sync-delimited"'*)
        printf '\377{"return": %s}\n' "$id" >&3 ;;
    *'"guest-sync"'*)
        printf '{"return": %s}\n' "$id" >&3 ;;
    *'"guest-ping"'*)
        printf '{"return": {}}\n' >&3 ;;
    *'"guest-fsfreeze-freeze"'*)
        freezes=$((freezes+1))
        if [ "$IGNORE_FREEZE" = 1 ]; then
            echo "FREEZE-IGNORED $freezes"
            continue
        fi
        sync
        n=0
        for mnt in $(filesystems); do
            if command -v fsfreeze >/dev/null && fsfreeze --freeze "$mnt"; then n=$((n+1)); fi
        done
        state=frozen
        mark 0 "FROZEN $freezes"
        echo "FROZEN $freezes $n"
        printf '{"return": %d}\n' $n >&3 ;;
    *'"guest-fsfreeze-thaw"'*)
        n=0
        if [ "$state" = frozen ]; then
            for mnt in $(filesystems); do fsfreeze --unfreeze "$mnt" 2>/dev/null && n=$((n+1)); done
        fi
        state=thawed
        mark 1 "THAWED $freezes"
        echo "THAWED $freezes"
        printf '{"return": %d}\n' $n >&3 ;;
    *'"guest-fsfreeze-status"'*)
        printf '{"return": "%s"}\n' "$state" >&3 ;;
    *)
        echo "AGENT-UNKNOWN $line"
        printf '{"error": {"class": "CommandNotFound", "desc": "unknown command"}}\n' >&3 ;;
    esac
done
"""


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for the agents' sockets (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hozon-qga-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def boot(qemu_vm: QemuVmFactory, sockets: Path, ignore_freeze: bool = False) -> tuple[QemuVm, Path, Path]:
    """The guest with the stand-in agent on one port and a port no one in the guest opens.

    Returns the VM, the agent's socket and the silent port's socket, once the agent listens.
    """
    agent, silent = sockets / "qga.sock", sockets / "silent.sock"
    initrd = guest.build_initramfs(RESPONDER.replace("@IGNORE_FREEZE@", "1" if ignore_freeze else "0"))
    vm = qemu_vm(disks=[("vda", "16M")], paused=False, serial=True, memory=256, extra_args=[
        *guest.boot_args(initrd), "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={agent},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-chardev", f"socket,id=qga1,path={silent},server=on,wait=off",
        "-device", "virtserialport,chardev=qga1,name=org.example.nobody.0",
    ])
    assert vm.serial_log is not None
    guest.wait_for_serial(vm.serial_log, "AGENT-LISTENING", timeout=60, alive=vm.running)
    return vm, agent, silent


def vm_backup(hozon: Hozon, vm: QemuVm, *args: str) -> tuple[dict[str, Any], float]:
    """The JSON result of ``hozon vm backup`` and how long the command took."""
    started = time.monotonic()
    run = hozon("vm", "backup", "--qmp", str(vm.hozon_qmp_path), "--name", "guest1", "--json", *args, check=False)
    took = time.monotonic() - started
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result, took


def serial(vm: QemuVm) -> str:
    assert vm.serial_log is not None
    return vm.serial_log.read_text(errors="replace").replace("\r\n", "\n")


def restored_marks(hozon: Hozon, snapshot_id: str, target: Path) -> tuple[bytes, bytes]:
    """Sectors 0 and 1 of the snapshot's disk, restored."""
    run = hozon("vm", "restore", snapshot_id[:8], "--to", str(target), "--format", "raw", check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    data = (target / "vda.raw").read_bytes()[:1024]
    return data[:512], data[512:]


def sector(text: str) -> bytes:
    return (text + "\n").encode().ljust(512, b"\0")


def test_backup_with_the_guest_agent_is_application_consistent_and_always_thaws(
        hozon: Hozon, qemu_vm: QemuVmFactory, sockets: Path, tmp_path: Path) -> None:
    vm, agent, silent = boot(qemu_vm, sockets)

    frozen, took = vm_backup(hozon, vm, "--guest-agent", str(agent))
    snap = frozen["snapshot"]
    assert snap["extra"]["consistency"] == "application", frozen["notes"]
    log = serial(vm)
    found = re.search(r"^FROZEN 1 (\d+)$", log, re.MULTILINE)
    assert found is not None, log[-2000:]
    assert snap["extra"]["frozen_filesystems"] == int(found.group(1)) == 0  # no block file system in this guest
    assert 0 < snap["summary"]["frozen_ms"] < took * 1000
    assert snap["summary"]["frozen_ms"] >= snap["summary"]["pause_ms"]  # the transaction ran while frozen
    assert any("froze no file system" in note for note in frozen["notes"]), frozen["notes"]
    assert log.index("FROZEN 1") < log.index("THAWED 1")  # thawed before the command ended
    assert "FREEZE-IGNORED" not in log and "AGENT-UNKNOWN" not in log, log[-2000:]

    plain, _ = vm_backup(hozon, vm)
    assert plain["snapshot"]["extra"]["consistency"] == "crash"
    assert "frozen_filesystems" not in plain["snapshot"]["extra"] and "frozen_ms" not in plain["snapshot"]["summary"]

    missing, _ = vm_backup(hozon, vm, "--guest-agent", str(sockets / "nothing.sock"))
    assert missing["snapshot"]["extra"]["consistency"] == "crash"
    assert f"the guest's file systems were not frozen: there is no guest agent socket at {sockets}/nothing.sock; " \
           "the backup is crash-consistent" in missing["notes"]

    mute, took = vm_backup(hozon, vm, "--guest-agent", str(silent))  # QEMU's port, nothing behind it in the guest
    assert mute["snapshot"]["extra"]["consistency"] == "crash"
    assert (f"the guest's file systems were not frozen: the guest agent at {silent} did not send the reply to "
            "guest-sync-delimited within 5 s; the backup is crash-consistent") in mute["notes"]
    assert took < 5 + 20
    assert "FROZEN 2" not in serial(vm) and "THAWED 2" not in serial(vm)

    with vm.monitor() as qmp:
        qmp.execute("quit")
    assert vm.wait(30) == 0, vm.output()
    # The first snapshot's instant lies between the freeze's mark and the thaw's; the others after both.
    assert restored_marks(hozon, snap["id"], tmp_path / "r1") == (sector("FROZEN 1"), bytes(512))
    assert restored_marks(hozon, plain["snapshot"]["id"], tmp_path / "r2") == (sector("FROZEN 1"), sector("THAWED 1"))
    print(f"\nguest frozen {snap['summary']['frozen_ms']} ms around a transaction of {snap['summary']['pause_ms']} ms")


def test_a_freeze_that_never_answers_gives_a_crash_consistent_backup_and_a_thaw(
        hozon: Hozon, qemu_vm: QemuVmFactory, sockets: Path, tmp_path: Path) -> None:
    vm, agent, _ = boot(qemu_vm, sockets, ignore_freeze=True)

    result, took = vm_backup(hozon, vm, "--guest-agent", str(agent))
    snap = result["snapshot"]
    assert snap["extra"]["consistency"] == "crash"
    assert snap["extra"]["frozen_filesystems"] == 0 and snap["summary"]["frozen_ms"] == 0
    assert (f"the guest's file systems were not frozen: the guest agent at {agent} did not send the reply to "
            f"guest-fsfreeze-freeze within {FREEZE_TIMEOUT} s; the backup is crash-consistent") in result["notes"]
    assert not any("WARNING" in note for note in result["notes"]), result["notes"]  # the thaw was answered
    assert FREEZE_TIMEOUT <= took < FREEZE_TIMEOUT + 20
    log = serial(vm)
    assert "FREEZE-IGNORED 1" in log and "THAWED 1" in log, log[-2000:]
    assert log.index("FREEZE-IGNORED 1") < log.index("THAWED 1")  # the thaw was still attempted

    with vm.monitor() as qmp:
        qmp.execute("quit")
    assert vm.wait(30) == 0, vm.output()
    assert restored_marks(hozon, snap["id"], tmp_path / "r") == (bytes(512), bytes(512))  # thawed after the instant
    print(f"\nbackup with a freeze that never answered took {took:.1f} s")
