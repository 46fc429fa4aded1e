"""hozon vm backup --libvirt DOMAIN --freeze: the guest frozen through libvirt's own channel to its agent.

Real here: libvirtd and the QEMU it runs, the domain's virtio-serial channel
``org.qemu.guest_agent.0`` whose host side libvirt itself holds, the guest's Linux kernel with
``virtio_console`` (the port is its ``/dev/vport*p1``), Hozon passing the agent's commands through
libvirt (``virsh qemu-agent-command --timeout``), and the backup. Not real: the agent. qemu-ga
needs more than the busybox initramfs of the test guest holds, so the guest runs the stand-in of
test_vm_guest_agent.py, :data:`RESPONDER`, unchanged: a shell script that serves ``guest-sync``
(libvirt's synchronisation), ``guest-ping`` and the freeze commands on the port. Its freeze and
thaw print ``FROZEN``/``THAWED`` on the serial console and mark sectors 0 and 1 of vda
(``O_DIRECT``, before the reply), so a restored snapshot shows where its instant lay.

The domain boots the test guest directly (``<kernel>``, ``<initrd>``, ``<cmdline>``). QEMU runs as
libvirt-qemu: the kernel, the initramfs, the disk and the serial log live in a directory of their
own, open to that user (libvirt hands each file over to it when the domain starts).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests import guest
from tests.conftest import Hozon
from tests.e2e import test_vm_libvirt as libvirt_tests
from tests.e2e.conftest import NEEDS_GUEST
from tests.e2e.test_vm_guest_agent import RESPONDER, restored_marks, sector
from tests.e2e.test_vm_libvirt import URI, DomainFactory, virsh

# The libvirt daemon of the session, and bare domains (no guest OS, no agent channel), as test_vm_libvirt has them.
libvirtd = libvirt_tests.libvirtd
libvirt_domain = libvirt_tests.libvirt_domain

AGENT_CHANNEL = "org.qemu.guest_agent.0"
FREEZE_TIMEOUT = 10  # Hozon's default
MiB = 1 << 20

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.xdist_group("libvirtd"),  # the daemon is shared: one worker
    *NEEDS_GUEST,
]


@dataclass
class AgentDomain:
    """A running libvirt domain booted into the test guest, the stand-in agent listening on its channel."""

    name: str
    serial_log: Path

    def serial(self) -> str:
        return self.serial_log.read_text(errors="replace").replace("\r\n", "\n")

    def running(self) -> bool:
        return virsh("domstate", self.name, check=False).strip() == "running"


def guest_domain_xml(name: str, kernel: Path, initrd: Path, disk: Path, serial_log: Path, memory_mib: int,
                     devices: str = "") -> str:
    """A domain that boots the test guest directly, its serial console into ``serial_log``; ``devices``: more."""
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type>"
            f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>console=ttyS0 panic=-1 quiet</cmdline></os>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
            "<devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk>"
            f"<serial type='file'><source path='{serial_log}'/><target port='0'/></serial>"
            f"{devices}<memballoon model='none'/>"
            "</devices></domain>")


def agent_domain_xml(name: str, kernel: Path, initrd: Path, disk: Path, serial_log: Path) -> str:
    return guest_domain_xml(name, kernel, initrd, disk, serial_log, 256,
                            f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>")


def wait_for_agent(name: str, timeout: float = 30) -> None:
    """Until the agent answers through libvirt, which connects to it once the guest opened its port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            virsh("qemu-agent-command", name, '{"execute":"guest-ping"}', "--timeout", "5", timeout=30)
            return
        except AssertionError as exc:
            live = ET.fromstring(virsh("dumpxml", name))
            states = [t.get("state") for t in live.iterfind("devices/channel/target")
                      if t.get("name") == AGENT_CHANNEL]
            assert time.monotonic() < deadline, f"the agent did not answer through libvirt (channel {states}): {exc}"
        time.sleep(0.2)


@pytest.fixture
def agent_domain(libvirtd: str) -> Iterator[Callable[..., AgentDomain]]:
    """Boots domains into the test guest with the stand-in agent: ``agent_domain(ignore_freeze=False)``."""
    workdir = Path(tempfile.mkdtemp(prefix="hozon-libvirt-qga-"))
    workdir.chmod(0o755)  # QEMU runs as libvirt-qemu; libvirt gives it each file, but it must reach them
    kernel = workdir / "vmlinuz"
    shutil.copyfile(guest.kernel_path(), kernel)  # the cache is under root's home, closed to libvirt-qemu
    names: list[str] = []

    def boot(ignore_freeze: bool = False) -> AgentDomain:
        name = f"hozon-test-qga-{uuid.uuid4().hex[:8]}"
        initrd = workdir / f"{name}.cpio"
        shutil.copyfile(guest.build_initramfs(RESPONDER.replace("@IGNORE_FREEZE@", "1" if ignore_freeze else "0")),
                        initrd)
        disk, serial_log = workdir / f"{name}-vda.qcow2", workdir / f"{name}-serial.log"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, capture_output=True,
                       timeout=60)
        xml = workdir / f"{name}.xml"
        xml.write_text(agent_domain_xml(name, kernel, initrd, disk, serial_log))
        names.append(name)
        virsh("define", "--file", str(xml))
        virsh("start", name)
        domain = AgentDomain(name, serial_log)
        guest.wait_for_serial(serial_log, "AGENT-LISTENING", timeout=60, alive=domain.running)
        wait_for_agent(name)
        return domain

    try:
        yield boot
    finally:
        for name in reversed(names):
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
            Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def vm_backup(hozon: Hozon, name: str, *args: str) -> tuple[dict[str, Any], float]:
    """The JSON result of ``hozon vm backup --libvirt NAME`` and how long the command took."""
    started = time.monotonic()
    run = hozon("vm", "backup", "--libvirt", name, "--connect", URI, "--json", *args, check=False)
    took = time.monotonic() - started
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result, took


def test_freeze_through_libvirt_is_application_consistent_and_always_thaws(
        hozon: Hozon, agent_domain: Callable[..., AgentDomain], libvirt_domain: DomainFactory,
        tmp_path: Path) -> None:
    domain = agent_domain()

    frozen, took = vm_backup(hozon, domain.name, "--freeze")
    snap = frozen["snapshot"]
    assert snap["extra"]["consistency"] == "application", frozen["notes"]
    log = domain.serial()
    found = re.search(r"^FROZEN 1 (\d+)$", log, re.MULTILINE)
    assert found is not None, log[-2000:]
    assert snap["extra"]["frozen_filesystems"] == int(found.group(1)) == 0  # no block file system in this guest
    assert 0 < snap["summary"]["frozen_ms"] < took * 1000
    assert snap["summary"]["frozen_ms"] >= snap["summary"]["pause_ms"]  # the transaction ran while frozen
    assert log.index("FROZEN 1") < log.index("THAWED 1")  # thawed before the command ended
    assert "FREEZE-IGNORED" not in log and "AGENT-UNKNOWN" not in log, log[-2000:]
    assert not any("WARNING" in note for note in frozen["notes"]), frozen["notes"]

    plain, _ = vm_backup(hozon, domain.name)
    assert plain["snapshot"]["extra"]["consistency"] == "crash"
    assert "frozen_filesystems" not in plain["snapshot"]["extra"] and "frozen_ms" not in plain["snapshot"]["summary"]
    assert "FROZEN 2" not in domain.serial() and "THAWED 2" not in domain.serial()

    # The first snapshot's instant lies between the freeze's mark and the thaw's; the second after both.
    assert restored_marks(hozon, snap["id"], tmp_path / "r1") == (sector("FROZEN 1"), bytes(512))
    assert restored_marks(hozon, plain["snapshot"]["id"], tmp_path / "r2") == (sector("FROZEN 1"), sector("THAWED 1"))

    # A running domain without an agent channel: crash-consistent, said so, and the backup is made.
    bare = libvirt_domain({"vda": 16 * MiB})
    virsh("resume", bare.name)
    without, _ = vm_backup(hozon, bare.name, "--freeze")
    assert without["snapshot"]["extra"]["consistency"] == "crash"
    assert (f"the guest's file systems were not frozen: libvirt domain {bare.name} has no guest agent channel; "
            "the backup is crash-consistent") in without["notes"], without["notes"]

    # The socket is --qmp's; libvirt keeps the domain's agent channel itself.
    refused = hozon("vm", "backup", "--libvirt", domain.name, "--guest-agent", "/run/qga.sock", check=False)
    assert refused.returncode == 2 and "--guest-agent SOCKET is for --qmp" in refused.stderr, refused.stderr
    assert "--libvirt DOMAIN --freeze" in refused.stderr
    refused = hozon("vm", "backup", "--qmp", str(tmp_path / "qmp.sock"), "--freeze", check=False)
    assert refused.returncode == 2 and "--freeze with --qmp needs the guest agent's socket" in refused.stderr
    print(f"\nguest frozen {snap['summary']['frozen_ms']} ms through libvirt around a transaction of "
          f"{snap['summary']['pause_ms']} ms")


def test_a_freeze_the_agent_never_answers_is_bounded_and_still_thawed(
        hozon: Hozon, agent_domain: Callable[..., AgentDomain], tmp_path: Path) -> None:
    domain = agent_domain(ignore_freeze=True)

    result, took = vm_backup(hozon, domain.name, "--freeze")
    snap = result["snapshot"]
    assert snap["extra"]["consistency"] == "crash"
    assert snap["extra"]["frozen_filesystems"] == 0 and snap["summary"]["frozen_ms"] == 0
    assert (f"the guest's file systems were not frozen: the guest agent of libvirt domain {domain.name} did not "
            f"answer guest-fsfreeze-freeze within {FREEZE_TIMEOUT} s; the backup is crash-consistent"
            ) in result["notes"], result["notes"]
    assert not any("WARNING" in note for note in result["notes"]), result["notes"]  # the thaw was answered
    assert FREEZE_TIMEOUT <= took < FREEZE_TIMEOUT + 20
    log = domain.serial()
    assert "FREEZE-IGNORED 1" in log and "THAWED 1" in log, log[-2000:]
    assert log.index("FREEZE-IGNORED 1") < log.index("THAWED 1")  # the thaw was still sent, and reached the agent
    assert restored_marks(hozon, snap["id"], tmp_path / "r") == (bytes(512), bytes(512))  # thawed after the instant
    print(f"\nbackup through libvirt with a freeze that never answered took {took:.1f} s")
