"""A VM job run by a real ``hozon agent run`` against a real QEMU, written into the server over
HTTPS, then restored on the server host: every disk equals what the guest wrote."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.e2e.test_vm_backup import Model
from tests.hozon_agents import enrol, running_agents, server_side_env
from tests.hozon_server import RunningServer, running_server

if TYPE_CHECKING:
    from tests.e2e.conftest import QemuVmFactory

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")]

MiB = 1 << 20


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    monkeypatch.setenv("HOZON_SERVER_TICK_SECONDS", "0.2")
    with running_server(tmp_path) as s:
        yield s


def test_a_vm_job_on_a_real_agent_restores_on_the_server(server: RunningServer, qemu_vm: QemuVmFactory,
                                                          tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "32M"), ("vdb", "16M")])
    model = Model(vm, {"vda": 32 * MiB, "vdb": 16 * MiB})
    model.write("vda", 0, 2 * MiB, 0xA1)
    model.write("vda", 20 * MiB, MiB + 4096, 0xA2)
    model.write("vdb", 3 * MiB, 64 * 1024, 0xB1)
    agent = enrol(server, tmp_path / "agent", "hv", "hv1")
    d = str(server.directory)
    server.hozon("job", "add", "web1-disks", "--dir", d, "--agent", "hv1", "--vm", "web1", "--qmp",
                 str(vm.hozon_qmp_path))
    expected = {}
    with running_agents(agent) as (process,):
        for round_ in range(2):  # a full backup, then an incremental one
            if round_:
                model.write("vdb", 5 * MiB, 8192, 0xC0)
            done = server.hozon("job", "run", "web1-disks", "--dir", d, "--wait", "--timeout", "300", "--json")
            run = json.loads(done.stdout)
            assert run["state"] == "succeeded", run
            expected[run["snapshot_id"]] = model.copy()
        assert process.stop() == 0
    assert "Traceback" not in process.output()
    env = server_side_env(server, "hv")
    listed = json.loads(server.hozon("vm", "ls", "--json", env=env).stdout)["web1"]
    assert [s["id"] for s in listed] == list(expected)
    assert [{disk["mode"] for disk in s["disks"]} for s in listed] == [{"full"}, {"incremental"}]
    for snapshot_id, disks in expected.items():
        target = tmp_path / f"restored-{snapshot_id[:8]}"
        server.hozon("vm", "restore", snapshot_id, "--to", str(target), "--format", "raw", env=env)
        for name, data in disks.items():
            assert (target / f"{name}.raw").read_bytes() == data, f"disk {name} of {snapshot_id[:8]}"
    log = [e["line"] for e in json.loads(server.hozon("job", "log", str(run["id"]), "--dir", d, "--json").stdout)]
    assert any(line.startswith(f"snapshot {run['snapshot_id']} saved") for line in log), log
    check = server.hozon("check", "--read-data", env=env, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_checkpoint_job_keeps_the_disks_and_the_vm_state(server: RunningServer, qemu_vm: QemuVmFactory,
                                                           tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "16M")], memory=64, paused=False)  # firmware runs: a state to keep
    model = Model(vm, {"vda": 16 * MiB})
    model.write("vda", MiB, MiB, 0x5C)
    agent = enrol(server, tmp_path / "agent", "hv", "hv1")
    d = str(server.directory)
    server.hozon("job", "add", "web1-state", "--dir", d, "--agent", "hv1", "--checkpoint", "web1", "--qmp",
                 str(vm.hozon_qmp_path))
    with running_agents(agent) as (process,):
        run = json.loads(server.hozon("job", "run", "web1-state", "--dir", d, "--wait", "--timeout", "300",
                                      "--json").stdout)
        assert process.stop() == 0
    assert run["state"] == "succeeded", run
    assert vm.running()  # the VM goes on after its checkpoint
    env = server_side_env(server, "hv")
    snap = json.loads(server.hozon("snapshots", "--json", env=env).stdout)[0]
    assert snap["id"] == run["snapshot_id"] and snap["kind"] == "checkpoint" and "job:web1-state" in snap["tags"]
    assert snap["extra"]["state"]["size"] > 0
    target = tmp_path / "restored"
    server.hozon("vm", "restore", run["snapshot_id"], "--to", str(target), "--format", "raw", env=env)
    assert (target / "vda.raw").read_bytes() == model.copy()["vda"]
