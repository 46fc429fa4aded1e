"""Image-level backups of a libvirt domain (``hozon vm backup --libvirt``) against a real libvirtd.

The session's ``libvirtd`` fixture uses the libvirt daemon already running, or starts
``virtlogd`` and ``libvirtd`` itself (root only) and stops them at the end. Domains are
``<domain type='qemu'>`` with two qcow2 disks and no guest OS, started paused: "guest writes" go
through the virtio devices with HMP ``qemu-io`` (``virsh qemu-monitor-command --hmp``), so they
pass the block layer and mark the dirty bitmaps as a guest's would. A model of each disk says what
every snapshot must restore to. The last test needs no libvirt: it checks how a saved definition
becomes the definition of a restored copy.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import Hozon

from hozon.sources.libvirt import RestoredDisk, copy_definition

URI = "qemu:///system"
MiB = 1 << 20
ORIGINAL_MAC = "52:54:00:4a:0e:01"
START_TIMEOUT = 120.0  # libvirtd probes QEMU's capabilities once at its first start (seconds with /dev/kvm usable)

pytestmark = pytest.mark.timeout(300)


def virsh(*args: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(["virsh", "--quiet", "--connect", URI, *args], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _libvirt_answers() -> bool:
    try:
        return subprocess.run(["virsh", "--connect", URI, "version"], capture_output=True, timeout=30,
                              check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs libvirt with scripts/setup --dev)")
    pytest.skip(reason)


def _give_kvm_to_group_kvm() -> None:
    """Left root-only, /dev/kvm makes libvirt re-probe QEMU at every start and define (~50 s each)."""
    try:
        st = os.stat("/dev/kvm")
        kvm = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return
    if st.st_gid != kvm or stat.S_IMODE(st.st_mode) != 0o660:
        os.chown("/dev/kvm", -1, kvm)
        os.chmod("/dev/kvm", 0o660)


def _daemon_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A libvirt daemon answering on qemu:///system: the running one, or one started here."""
    if shutil.which("virsh") is None or shutil.which("libvirtd") is None:
        _unavailable("libvirt is not installed (Debian: libvirt-daemon-system libvirt-clients)")
    if os.geteuid() == 0:
        _give_kvm_to_group_kvm()  # also for a running daemon: something may have changed /dev/kvm since
    if _libvirt_answers():
        yield URI
        return
    if os.geteuid() != 0:
        _unavailable("no libvirtd is running on qemu:///system, and only root can start one")
    started: list[int] = []
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if _daemon_pid(pidfile) is None:
            subprocess.run([daemon, "-d"], check=True, timeout=30, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while (pid := _daemon_pid(pidfile)) is None:
                assert time.monotonic() < deadline, f"{daemon} -d wrote no {pidfile}"
                time.sleep(0.05)
            started.append(pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _libvirt_answers():
            assert time.monotonic() < deadline, f"libvirtd did not answer on {URI} within {START_TIMEOUT:g} s"
            time.sleep(0.2)
        yield URI
    finally:
        for pid in reversed(started):
            _stop_daemon(pid)


@dataclass
class Domain:
    """A running test domain and a model of what its disks hold."""

    name: str
    workdir: Path
    disks: dict[str, bytearray]  # by target: vda, vdb
    qdev: dict[str, str]  # target → the device's qdev id (libvirt's alias)

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        out = virsh("qemu-monitor-command", self.name, "--hmp",
                    f'qemu-io -d {self.qdev[disk]}/virtio-backend "write -P {pattern} {offset} {length}"')
        assert "error" not in out.lower(), out
        self.disks[disk][offset : offset + length] = bytes([pattern]) * length

    def copy(self) -> dict[str, bytes]:
        return {name: bytes(data) for name, data in self.disks.items()}

    def block_nodes(self) -> list[dict]:
        reply = json.loads(virsh("qemu-monitor-command", self.name,
                                 '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'))
        return list(reply["return"])


def domain_xml(name: str, disks: dict[str, Path]) -> str:
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
        f"<target dev='{target}' bus='virtio'/></disk>"
        for target, path in disks.items())
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
            f"<devices>{devices}<interface type='user'><mac address='{ORIGINAL_MAC}'/><model type='virtio'/>"
            "</interface></devices></domain>")


class DomainFactory:
    """Defines and starts (paused) domains with qcow2 disks ``{target: size}``: ``libvirt_domain({"vda": …})``.

    Every domain it started, and every name added to ``created`` (restored copies), is destroyed and
    undefined at the end.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.created: list[str] = []

    def __call__(self, sizes: dict[str, int]) -> Domain:
        name = f"hozon-test-{uuid.uuid4().hex[:8]}"
        images = {}
        for target, size in sizes.items():
            images[target] = self.workdir / f"{name}-{target}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images[target]), str(size)], check=True,
                           capture_output=True, timeout=60)
        xml = self.workdir / f"{name}.xml"
        xml.write_text(domain_xml(name, images))
        self.created.append(name)
        virsh("define", "--file", str(xml))
        virsh("start", "--paused", name)
        live = ET.fromstring(virsh("dumpxml", name))
        qdev = {_attr(d, "target", "dev"): _attr(d, "alias", "name") for d in live.iterfind("devices/disk")}
        return Domain(name, self.workdir, {t: bytearray(s) for t, s in sizes.items()}, qdev)

    def remove_all(self) -> None:
        for name in reversed(self.created):
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
            Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)


def _attr(element: ET.Element, child: str, attribute: str) -> str:
    found = element.find(child)
    assert found is not None, f"<{element.tag}> has no <{child}>"
    return str(found.get(attribute))


@pytest.fixture
def libvirt_domain(libvirtd: str) -> Iterator[DomainFactory]:
    # QEMU runs as libvirt-qemu: the images' directory must be open to it (pytest's tmp_path is not)
    workdir = Path(tempfile.mkdtemp(prefix="hozon-libvirt-"))
    workdir.chmod(0o755)
    factory = DomainFactory(workdir)
    try:
        yield factory
    finally:
        factory.remove_all()
        shutil.rmtree(workdir, ignore_errors=True)


def vm_backup(hozon: Hozon, domain: Domain, *args: str) -> dict:
    result = hozon("vm", "backup", "--libvirt", domain.name, "--json", *args)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def disk_modes(result: dict) -> dict[str, str]:
    return {d["name"]: d["mode"] for d in result["snapshot"]["extra"]["disks"]}


def assert_restores(hozon: Hozon, target: Path, snapshot_id: str, expected: dict[str, bytes]) -> None:
    hozon("vm", "restore", snapshot_id[:8], "--to", str(target), "--format", "raw")
    for name, data in expected.items():
        restored = (target / f"{name}.raw").read_bytes()
        assert restored == data, f"disk {name} of snapshot {snapshot_id[:8]} differs"


def test_libvirt_domain_full_incremental_restore_and_define(hozon: Hozon, libvirt_domain: DomainFactory,
                                                            tmp_path: Path) -> None:
    domain = libvirt_domain({"vda": 48 * MiB, "vdb": 16 * MiB})
    domain.write("vda", 0, 3 * MiB, 0xA1)
    domain.write("vda", 30 * MiB + 4096, 64 * 1024, 0xA2)
    domain.write("vdb", 5 * MiB, 128 * 1024, 0xB1)

    first = vm_backup(hozon, domain, "--connect", URI)
    assert disk_modes(first) == {"vda": "full", "vdb": "full"}  # named by their libvirt targets
    extra = first["snapshot"]["extra"]
    assert extra["vm"] == domain.name and extra["source"] == "libvirt"
    saved = ET.fromstring(extra["domain_xml"])
    assert saved.findtext("name") == domain.name
    assert {d.get("file") for d in saved.iterfind("devices/disk/source")} == {
        str(domain.workdir / f"{domain.name}-vda.qcow2"), str(domain.workdir / f"{domain.name}-vdb.qcow2")}
    expected = {first["snapshot"]["id"]: domain.copy()}

    domain.write("vda", 10 * MiB + 512, 8192, 0xC1)
    domain.write("vdb", MiB, 4096, 0xD1)
    scratch = domain.workdir / "scratch"  # the first backup used the default, the system's temporary directory
    scratch.mkdir()
    second = vm_backup(hozon, domain, "--scratch", str(scratch))
    assert disk_modes(second) == {"vda": "incremental", "vdb": "incremental"}, second["notes"]
    assert second["snapshot"]["summary"]["bytes_read"] == 2 * MiB  # one changed chunk per disk
    expected[second["snapshot"]["id"]] = domain.copy()

    # the bitmaps are persistent: they survive the domain's stop and start through libvirt
    virsh("destroy", domain.name)
    virsh("start", "--paused", domain.name)
    domain.write("vda", 20 * MiB, MiB, 0xE1)
    third = vm_backup(hozon, domain, "--scratch", str(scratch))
    assert disk_modes(third) == {"vda": "incremental", "vdb": "incremental"}, third["notes"]
    assert third["snapshot"]["summary"]["bytes_read"] == MiB
    expected[third["snapshot"]["id"]] = domain.copy()

    # nothing of the backups is left in QEMU but the one bitmap per disk for the next backup
    nodes = domain.block_nodes()
    assert not [n["node-name"] for n in nodes if str(n["node-name"]).startswith("hozon-")]
    bitmaps = {n["node-name"]: [b["name"] for b in n["dirty-bitmaps"]] for n in nodes if n.get("dirty-bitmaps")}
    assert sorted(len(b) for b in bitmaps.values()) == [1, 1], bitmaps
    assert list(scratch.iterdir()) == []

    for n, (snapshot_id, disks) in enumerate(expected.items()):
        assert_restores(hozon, tmp_path / f"raw{n}", snapshot_id, disks)

    # defined again in libvirt as a copy beside the original
    copy = f"{domain.name}-copy1"
    libvirt_domain.created.append(copy)
    target = domain.workdir / "copy1"  # QEMU (libvirt-qemu) must reach it
    out = hozon("vm", "restore", third["snapshot"]["id"][:8], "--to", str(target), "--libvirt-define", copy)
    assert f"defined libvirt domain {copy}" in out.stdout, out.stdout
    defined = ET.fromstring(virsh("dumpxml", "--inactive", copy))
    assert defined.findtext("name") == copy
    assert defined.findtext("uuid") not in (None, "", virsh("domuuid", domain.name).strip())
    disks = {_attr(d, "target", "dev"): (_attr(d, "source", "file"), _attr(d, "driver", "type"))
             for d in defined.iterfind("devices/disk")}
    assert disks == {"vda": (str(target / "vda.qcow2"), "qcow2"), "vdb": (str(target / "vdb.qcow2"), "qcow2")}
    macs = [m.get("address") for m in defined.iterfind("devices/interface/mac")]
    assert len(macs) == 1 and macs[0] != ORIGINAL_MAC  # a copy beside the original gets its own MAC
    assert (target / "domain.xml").read_text() == extra["domain_xml"]

    # and it runs on the restored images
    virsh("start", "--paused", copy)
    virsh("qemu-monitor-command", copy, "--hmp", 'qemu-io -d virtio-disk0/virtio-backend "read -P 0xe1 20M 1M"')
    virsh("qemu-monitor-command", copy, "--hmp", 'qemu-io -d virtio-disk1/virtio-backend "read -P 0xd1 1M 4k"')
    log = Path(f"/var/log/libvirt/qemu/{copy}.log").read_text(errors="replace")
    assert "Pattern verification failed" not in log
    assert "read 1048576/1048576 bytes at offset 20971520" in log and "read 4096/4096 bytes at offset 1048576" in log, \
        log[-2000:]


def test_a_domain_destroyed_mid_backup_leaves_no_snapshot(hozon: Hozon, libvirt_domain: DomainFactory) -> None:
    domain = libvirt_domain({"vda": 1024 * MiB})
    for i in range(0, 1024, 64):
        domain.write("vda", i * MiB, 32 * MiB, 0x40 + i % 7)
    scratch = domain.workdir / "scratch"
    scratch.mkdir()
    proc = hozon.popen("vm", "backup", "--libvirt", domain.name, "--scratch", str(scratch))
    deadline = time.monotonic() + 60
    while not list(scratch.glob("hozon-*/*.fleece.qcow2")):  # the point in time exists: reading begins
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    virsh("destroy", domain.name)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and err.startswith("hozon: error:"), err
    assert json.loads(hozon("snapshots", "--json").stdout) == []
    assert list(scratch.iterdir()) == []
    assert hozon("check").returncode == 0


def test_clear_errors_for_a_missing_domain_and_a_snapshot_without_definition(
        hozon: Hozon, libvirtd: str, tmp_path: Path) -> None:
    missing = hozon("vm", "backup", "--libvirt", "hozon-no-such-domain", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "has no domain 'hozon-no-such-domain'" in missing.stderr, missing.stderr

    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True, timeout=60)
    snap = json.loads(hozon("vm", "backup", "--image", str(image), "--name", "offline", "--json").stdout)
    refused = hozon("vm", "restore", snap["snapshot"]["id"][:8], "--to", str(tmp_path / "r"),
                    "--libvirt-define", "hozon-never-defined", check=False)
    assert refused.returncode == 2 and "holds no libvirt definition" in refused.stderr, refused.stderr
    assert not (tmp_path / "r").exists()


def test_copy_definition_takes_the_restored_images_and_a_new_identity() -> None:
    """No libvirt needed: how a saved definition becomes the definition of a copy."""
    saved = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>2f9b0a57-1d6c-4f61-9d1e-2b7c1b1f0a11</uuid>
  <metadata><app:owner xmlns:app='urn:example:app'>ops</app:owner></metadata>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username='admin'><secret type='ceph' usage='ceph-secret'/></auth>
      <source protocol='rbd' name='pool/web1-root'><host name='10.0.0.1' port='6789'/></source>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web1-data.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/images/base.qcow2'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/tools.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
  </devices>
  <qemu:commandline><qemu:arg value='-no-hpet'/></qemu:commandline>
</domain>"""
    xml, notes = copy_definition(saved, "web1-copy", [RestoredDisk("vda", "/restore/vda.qcow2", "qcow2"),
                                                       RestoredDisk("vdb", "/restore/vdb.raw", "raw")])
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web1-copy" and root.find("uuid") is None
    disks = {_attr(d, "target", "dev"): d for d in root.iterfind("devices/disk")}
    for target, path, fmt in (("vda", "/restore/vda.qcow2", "qcow2"), ("vdb", "/restore/vdb.raw", "raw")):
        disk = disks[target]
        assert disk.get("type") == "file" and _attr(disk, "driver", "type") == fmt
        source = disk.find("source")
        assert source is not None and source.attrib == {"file": path} and not list(source)
        assert disk.find("auth") is None and disk.find("backingStore") is None
    assert _attr(disks["vda"], "driver", "cache") == "none" and disks["vda"].find("boot") is not None
    assert _attr(disks["sda"], "source", "file") == "/isos/tools.iso"  # not in the snapshot: as it was
    assert root.find("devices/interface/mac") is None
    assert _attr(root, "devices/interface/source", "network") == "default"
    assert root.find("os/nvram") is None and root.find("os/loader") is not None
    assert "xmlns:qemu=" in xml and "<qemu:commandline>" in xml and "<app:owner" in xml
    assert any("UEFI" in note for note in notes)


def test_the_systemd_vm_unit_backs_up_a_domain_and_applies_retention(hozon: Hozon,
                                                                    libvirt_domain: DomainFactory) -> None:
    from tests.systemd_units import UNITS, read_env_file, run_unit

    domain = libvirt_domain({"vda": 8 * MiB})
    other = libvirt_domain({"vda": 8 * MiB})
    env = read_env_file(UNITS / "hozon.env.example")
    env.update(HOZON_REPO=str(hozon.repo), HOZON_PASSWORD=hozon.env["HOZON_PASSWORD"], HOZON_KEEP="--keep-last 1")
    env.pop("HOZON_PASSWORD_FILE")
    hozon("vm", "backup", "--libvirt", other.name, "--tag", "systemd")  # another VM's snapshot: not its business
    for _night in range(2):
        runs = run_unit("hozon-vm-backup@.service", env, instance=domain.name)
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
        assert "Traceback" not in runs[0].stderr
    snaps = json.loads(hozon("snapshots", "--json").stdout)
    mine = [s for s in snaps if s["paths"] == [domain.name]]
    assert len(mine) == 1 and mine[0]["tags"] == ["systemd"]  # the unit's retention kept the newest
    assert [s["paths"] for s in snaps if s not in mine] == [[other.name]]
