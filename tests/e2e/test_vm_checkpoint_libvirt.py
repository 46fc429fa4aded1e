"""hozon vm checkpoint --libvirt DOMAIN: checkpoints of domains that libvirt runs, and how they come back.

Real here: libvirtd, the QEMU it runs (as user libvirt-qemu, under libvirt's seccomp sandbox,
which forbids ``exec:`` migration), the state pipe handed to that QEMU through libvirt
(``qemu-monitor-command --pass-fds``), the save image Hozon writes for ``virsh restore``, and the
repository. The first test's domain runs its firmware only (no guest OS): its state is real all
the same. The second boots the test guest counting on its serial console (test_vm_checkpoint's
COUNTER) and brings it back three ways: as a copy beside the running original, as the domain
itself once the original is gone, and as a paused copy whose memory becomes an ELF core.

QEMU 7.2 write-protects guest memory with userfaultfd, which an unprivileged process may use only
when ``vm.unprivileged_userfaultfd`` is 1; the tests set it for their run and put it back.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
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
from tests.e2e.test_vm_checkpoint import COUNTER, MARKER, ticks
from tests.e2e.test_vm_libvirt import URI, DomainFactory, virsh
from tests.e2e.test_vm_libvirt_agent import guest_domain_xml

libvirtd = libvirt_tests.libvirtd
libvirt_domain = libvirt_tests.libvirt_domain
MiB = 1 << 20
SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
MAC = "52:54:00:4a:0e:42"
SAVE_HEADER = struct.Struct("<16sIIIII56x")

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.xdist_group("libvirtd"),  # the daemon is shared: one worker
    *NEEDS_GUEST,
]


@pytest.fixture
def unprivileged_userfaultfd() -> Iterator[None]:
    if not SYSCTL.exists():
        pytest.skip("this kernel has no vm.unprivileged_userfaultfd")
    before = SYSCTL.read_text().strip()
    SYSCTL.write_text("1")
    try:
        yield
    finally:
        SYSCTL.write_text(before)


def test_a_checkpoint_through_libvirt_keeps_state_disks_and_definition(
        hozon: Hozon, libvirt_domain: DomainFactory, unprivileged_userfaultfd: None, tmp_path: Path) -> None:
    domain = libvirt_domain({"vda": 16 * MiB})
    virsh("resume", domain.name)
    run = hozon("vm", "checkpoint", "--libvirt", domain.name, "--connect", URI, "--json", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    snap = json.loads(run.stdout)["snapshot"]
    assert snap["kind"] == "checkpoint" and snap["extra"]["source"] == "libvirt"
    assert snap["extra"]["state"]["size"] > 0 and "<domain" in snap["extra"]["domain_xml"]
    assert virsh("domstate", domain.name).strip() == "running"
    jobs = json.loads(virsh("qemu-monitor-command", domain.name, '{"execute":"query-block-jobs"}'))["return"]
    assert jobs == []

    assert snap["extra"]["qemu_binary"] == "/usr/bin/qemu-system-x86_64" and snap["extra"]["state"]["was_running"]
    assert ET.fromstring(snap["extra"]["running_xml"]).findtext("uuid") == virsh("domuuid", domain.name).strip()

    # Without --start: the disks and a libvirt save image, and the command that resumes it.
    target = tmp_path / "restored"
    out = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(target)).stdout
    save = target / "vmstate.save"
    magic, version, data_len, was_running, fmt, cookie = SAVE_HEADER.unpack_from(save.read_bytes())
    assert (magic, version, was_running, fmt, cookie) == (b"LibvirtQemudSave", 2, 1, 0, 0)
    xml = save.read_bytes()[SAVE_HEADER.size:SAVE_HEADER.size + data_len].split(b"\0", 1)[0].decode()
    assert [s.get("file") for s in ET.fromstring(xml).iterfind("devices/disk/source")] == [str(target / "vda.qcow2")]
    assert save.stat().st_size == SAVE_HEADER.size + data_len + snap["extra"]["state"]["size"]
    assert f"virsh --quiet --connect {URI} restore {save}" in out

    # The domain runs, so it cannot take the state; nothing is written for a refused restore.
    refused = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(tmp_path / "again"), "--start",
                    check=False)
    assert refused.returncode == 1 and "is running" in refused.stderr and "--as NAME" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "again").exists()
    checked = hozon("check", "--read-data", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@dataclass
class CountingDomain:
    """A libvirt domain booted into the counting test guest; its serial console goes to ``serial_log``."""

    name: str
    workdir: Path
    serial_log: Path

    def running(self) -> bool:
        return virsh("domstate", self.name, check=False).strip() == "running"


def counting_domain_xml(name: str, kernel: Path, initrd: Path, disk: Path, serial_log: Path) -> str:
    return guest_domain_xml(name, kernel, initrd, disk, serial_log, 128,
                            f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"
                            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")


@pytest.fixture
def counting_domain(libvirtd: str) -> Iterator[tuple[CountingDomain, list[str]]]:
    """A counting domain, and a list of further domain names (resumed copies) to remove at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="hozon-libvirt-checkpoint-"))
    workdir.chmod(0o755)  # QEMU runs as libvirt-qemu; libvirt gives it each file, but it must reach them
    name = f"hozon-test-cp-{uuid.uuid4().hex[:8]}"
    kernel, initrd = workdir / "vmlinuz", workdir / "counter.cpio"
    shutil.copyfile(guest.kernel_path(), kernel)  # the cache is under root's home, closed to libvirt-qemu
    shutil.copyfile(guest.build_initramfs(COUNTER), initrd)
    disk, serial_log = workdir / "vda.qcow2", workdir / "serial.log"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True, capture_output=True,
                   timeout=60)
    xml = workdir / f"{name}.xml"
    xml.write_text(counting_domain_xml(name, kernel, initrd, disk, serial_log))
    names = [name]
    try:
        virsh("define", "--file", str(xml))
        virsh("start", name)
        domain = CountingDomain(name, workdir, serial_log)
        guest.wait_for_serial(serial_log, "TICK 3", timeout=90, alive=domain.running)
        yield domain, names
    finally:
        for created in reversed(names):
            virsh("destroy", created, check=False)
            virsh("undefine", created, check=False)
            Path(f"/var/log/libvirt/qemu/{created}.log").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def counts_on(log: Path, before: int, after: int, alive: Callable[[], bool]) -> list[int]:
    """The ticks a resumed guest prints into ``log``: on from the instant (between ``before`` and ``after``)."""
    guest.wait_for_serial(log, "TICK", timeout=60, alive=alive)
    time.sleep(1)
    text = log.read_text(errors="replace")
    counted = ticks(text)
    assert counted and before <= counted[0] - 1 <= after, (before, counted[:3], after)
    assert counted == list(range(counted[0], counted[0] + len(counted)))
    assert guest.READY_MARKER not in text and "Linux version" not in text  # no boot
    return counted


def test_a_libvirt_checkpoint_resumes_as_a_copy_and_as_itself_and_exports_its_memory(
        hozon: Hozon, counting_domain: tuple[CountingDomain, list[str]], unprivileged_userfaultfd: None) -> None:
    domain, created = counting_domain
    before = max(ticks(domain.serial_log.read_text(errors="replace")))
    run = hozon("vm", "checkpoint", "--libvirt", domain.name, "--connect", URI, "--json", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    snap: dict[str, Any] = json.loads(run.stdout)["snapshot"]
    after = max(ticks(domain.serial_log.read_text(errors="replace")))
    assert snap["extra"]["interfaces"] == [{"name": "net0", "mac": MAC}]
    restore_dir = domain.workdir / "restored"

    # A copy beside the running original: its own name, UUID and serial log, its link down.
    copy = f"{domain.name}-copy"
    created.append(copy)
    run = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(domain.workdir / "copy"), "--start",
                "--as", copy, check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert f"as libvirt domain {copy}: running" in run.stdout and "transient domain" in run.stderr
    copy_log = domain.workdir / "copy" / f"{copy}-serial0.log"
    counts_on(copy_log, before, after, alive=lambda: virsh("domstate", copy, check=False).strip() == "running")
    assert virsh("domuuid", copy).strip() != virsh("domuuid", domain.name).strip()
    assert virsh("domif-getlink", copy, MAC).split()[-1] == "down"
    assert domain.running()
    virsh("destroy", copy)

    # --paused: loaded, waiting for virsh resume.
    paused_copy = f"{domain.name}-paused"
    created.append(paused_copy)
    run = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(domain.workdir / "paused"), "--start",
                "--paused", "--as", paused_copy)
    assert "paused (virsh resume to run it)" in run.stdout
    paused_log = domain.workdir / "paused" / f"{paused_copy}-serial0.log"
    time.sleep(1.5)
    assert virsh("domstate", paused_copy).strip() == "paused"
    assert ticks(paused_log.read_text(errors="replace") if paused_log.exists() else "") == []
    virsh("resume", paused_copy)
    counts_on(paused_log, before, after, alive=lambda: virsh("domstate", paused_copy, check=False).strip() == "running")
    virsh("destroy", paused_copy)

    # The memory, from a paused copy that libvirt loads and then forgets; one that a killed Hozon left goes too.
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = f"hozon-memory-{snap['id'][:8]}-{dead.pid}-abcdef"
    created.append(abandoned)
    bare = domain.workdir / "abandoned.xml"
    bare.write_text(f"<domain type='qemu'><name>{abandoned}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
                    "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>")
    virsh("create", str(bare), "--paused")
    core = domain.workdir / "memory.elf"
    out = hozon("vm", "memory", snap["id"][:8], "--to", str(core)).stdout
    assert "ELF core" in out
    data = core.read_bytes()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 16)[0] == 4  # ET_CORE
    assert 128 * MiB <= len(data) < 132 * MiB and MARKER.encode() in data
    assert "hozon-memory" not in virsh("list", "--all", "--name")
    assert domain.running()

    # The original is gone: the checkpoint takes its place, counting on from the instant, on the restored disk.
    virsh("destroy", domain.name)
    domain.serial_log.unlink()
    run = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(restore_dir), "--start", check=False)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    assert f"as libvirt domain {domain.name}: running" in run.stdout
    counts_on(domain.serial_log, before, after, alive=domain.running)
    assert str(restore_dir / "vda.qcow2") in virsh("domblklist", domain.name)
    assert virsh("dominfo", domain.name).count("Persistent:     yes") == 1
    assert sorted(p.name for p in restore_dir.iterdir()) == sorted(
        ["vda.qcow2", "vmstate.save", f"checkpoint-{snap['id'][:8]}.json"])


def qmp_through_libvirt(name: str, command: str) -> Any:
    return json.loads(virsh("qemu-monitor-command", name, json.dumps({"execute": command})))["return"]


def test_a_libvirt_checkpoint_killed_mid_stream_leaves_the_domain_running_and_clean(
        hozon: Hozon, counting_domain: tuple[CountingDomain, list[str]], unprivileged_userfaultfd: None) -> None:
    domain, _ = counting_domain
    proc = hozon.popen("vm", "checkpoint", "--libvirt", domain.name, "--connect", URI)
    try:  # kill Hozon while the guest's memory streams into it
        deadline = time.monotonic() + 60
        while qmp_through_libvirt(domain.name, "query-migrate").get("status") != "active":
            assert proc.poll() is None, "the checkpoint ended before it could be killed"
            assert time.monotonic() < deadline, "the state never started streaming"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    deadline = time.monotonic() + 30  # the guardian undoes what the killed Hozon left, through libvirt
    while True:
        jobs, exports = qmp_through_libvirt(domain.name, "query-block-jobs"), \
            qmp_through_libvirt(domain.name, "query-block-exports")
        nodes = [n["node-name"] for n in qmp_through_libvirt(domain.name, "query-named-block-nodes")
                 if "hozon" in n["node-name"]]
        caps = {c["capability"]: c["state"] for c in qmp_through_libvirt(domain.name, "query-migrate-capabilities")}
        migration = qmp_through_libvirt(domain.name, "query-migrate").get("status")
        if not (jobs or exports or nodes) and not caps["background-snapshot"] and domain.running() and \
                migration in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, (jobs, exports, nodes, caps, migration)
        time.sleep(0.2)
    counted = len(ticks(domain.serial_log.read_text(errors="replace")))
    guest.wait_for_serial(domain.serial_log, f"TICK {counted + 2}", timeout=30, alive=domain.running)  # it runs on
    assert json.loads(hozon("snapshots", "--json").stdout) == []  # no partial checkpoint
    checked = hozon("check", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    run = hozon("vm", "checkpoint", "--libvirt", domain.name, "--connect", URI, "--json", check=False)
    assert run.returncode == 0, run.stdout + run.stderr  # and the next one works
