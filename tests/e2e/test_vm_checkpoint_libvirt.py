"""hozon vm checkpoint --libvirt DOMAIN: a checkpoint of a domain that libvirt runs.

Real here: libvirtd, the QEMU it runs (as user libvirt-qemu, under libvirt's seccomp sandbox,
which forbids ``exec:`` migration), the state pipe handed to that QEMU through libvirt
(``qemu-monitor-command --pass-fds``), and the repository. The domain runs its firmware only (no
guest OS): its state is real all the same. QEMU 7.2 write-protects guest memory with
userfaultfd, which an unprivileged process may use only when ``vm.unprivileged_userfaultfd`` is 1;
the test sets it for its run and puts it back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import Hozon
from tests.e2e import test_vm_libvirt as libvirt_tests
from tests.e2e.test_vm_libvirt import URI, DomainFactory, virsh

libvirtd = libvirt_tests.libvirtd
libvirt_domain = libvirt_tests.libvirt_domain
MiB = 1 << 20
SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64 (CI installs it)"),
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

    target = tmp_path / "restored"
    out = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(target)).stdout
    assert (target / "vda.qcow2").exists() and (target / "vmstate").stat().st_size == snap["extra"]["state"]["size"]
    assert "kept no QEMU command line" in out
    refused = hozon("vm", "checkpoint", "restore", snap["id"], "--to", str(tmp_path / "again"), "--start",
                    check=False)
    assert refused.returncode == 2 and "kept no QEMU command line" in refused.stderr, refused.stderr
    checked = hozon("check", "--read-data", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
