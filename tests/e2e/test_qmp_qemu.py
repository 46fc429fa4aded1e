"""Hozon's QMP client against a real qemu-system-x86_64 (paused: block-layer work runs no guest code).

Guest writes come from HMP ``qemu-io -d vda/virtio-backend``, which goes through the device's
block backend exactly like a guest's write, so it marks dirty bitmaps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hozon.sources.qemu import QmpClient, QmpCommandError, QmpError

if TYPE_CHECKING:
    from conftest import QemuVm, QemuVmFactory

KiB = 1024
MiB = 1024 * KiB

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-io") is None,
        reason="needs qemu-system-x86_64, qemu-img and qemu-io (Debian qemu-system-x86, qemu-utils); CI installs them",
    ),
]


def bitmaps(client: QmpClient, node: str) -> dict[str, dict[str, Any]]:
    for info in client.execute("query-named-block-nodes", {"flat": True}):
        if info["node-name"] == node:
            return {b["name"]: b for b in info.get("dirty-bitmaps", [])}
    raise AssertionError(f"no node {node}")


def guest_write(client: QmpClient, vm: QemuVm, disk: str, command: str) -> None:
    """A write through the device, as the guest would make it; HMP reports failures as text."""
    output = client.hmp(f'qemu-io -d {vm.disks[disk].qemu_io_device} "{command}"')
    assert "error" not in output.lower() and "failed" not in output.lower(), output


def test_greeting_gives_the_version_that_query_version_reports(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as client:
        reply = client.execute("query-version")
        assert tuple(client.version) == (reply["qemu"]["major"], reply["qemu"]["minor"], reply["qemu"]["micro"])
        assert client.version >= (7, 2)
        assert client.package == reply["package"].strip()
        assert str(client.version) in subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                                     text=True, check=True).stdout
        assert client.execute("query-status")["status"] == "prelaunch"


def test_block_queries_show_the_disk_by_device_and_node(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm(disks=[("vda", "64M"), ("vdb", "1M")])
    with vm.monitor() as client:
        blocks = {b["qdev"]: b for b in client.execute("query-block")}
        vda = blocks["/machine/peripheral/vda/virtio-backend"]["inserted"]
        assert vda["node-name"] == "vda-format"
        assert vda["image"]["virtual-size"] == 64 * MiB and vda["image"]["format"] == "qcow2"
        nodes = {n["node-name"]: n for n in client.execute("query-named-block-nodes", {"flat": True})}
        assert {"vda-format", "vda-file", "vdb-format", "vdb-file"} <= set(nodes)
        assert nodes["vdb-file"]["file"] == str(vm.disks["vdb"].path)


def test_persistent_bitmap_counts_guest_writes_and_is_stored_in_the_image(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    node = vm.disks["vda"].node
    with vm.monitor() as client:
        client.execute("block-dirty-bitmap-add", {"node": node, "name": "hozon-0", "persistent": True})
        assert bitmaps(client, node)["hozon-0"]["count"] == 0
        guest_write(client, vm, "vda", "write -P 0xab 0 64k")
        guest_write(client, vm, "vda", "write -P 0xcd 1M 4k")  # one 64 KiB granule
        bitmap = bitmaps(client, node)["hozon-0"]
        assert bitmap["persistent"] and bitmap["recording"] and bitmap["count"] == 128 * KiB
    assert vm.stop() == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vm.disks["vda"].path)],
                                     capture_output=True, text=True, check=True).stdout)
    stored = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in stored] == [("hozon-0", ["auto"])]
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xcd 1M 4k",
                           str(vm.disks["vda"].path)], capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in read.stdout


def test_transaction_applies_all_actions_or_none(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    node = vm.disks["vda"].node
    with vm.monitor() as client:
        client.execute("block-dirty-bitmap-add", {"node": node, "name": "b0", "persistent": True})
        guest_write(client, vm, "vda", "write 0 64k")
        client.transaction([
            {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": "b0"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": "b1", "persistent": True}},
        ])
        guest_write(client, vm, "vda", "write 2M 64k")
        after = bitmaps(client, node)
        assert (after["b0"]["recording"], after["b0"]["count"]) == (False, 64 * KiB)
        assert (after["b1"]["recording"], after["b1"]["count"]) == (True, 64 * KiB)

        with pytest.raises(QmpCommandError) as caught:
            client.transaction([
                {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": "b2"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": "b1"}},  # exists already
            ])
        assert caught.value.command == "transaction"
        assert "b1" in str(caught.value)
        assert set(bitmaps(client, node)) == {"b0", "b1"}  # b2 was rolled back


def test_qemu_errors_become_one_sentence_with_class_description_and_command(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as client:
        with pytest.raises(QmpCommandError) as caught:
            client.execute("block-dirty-bitmap-add", {"node": "no-such-node", "name": "b0"})
        err = caught.value
        assert (err.command, err.error_class) == ("block-dirty-bitmap-add", "GenericError")
        assert str(err) == f"QMP command block-dirty-bitmap-add failed with GenericError: {err.desc}"
        assert "no-such-node" in err.desc
        assert err.exit_code == 1

        with pytest.raises(QmpCommandError) as caught:
            client.execute("no-such-command")
        assert caught.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(caught.value)
        assert client.execute("query-status")["status"] == "prelaunch"  # the session goes on


def test_job_events_arriving_between_replies_are_queued_and_awaited(qemu_vm: QemuVmFactory, tmp_path: Path) -> None:
    vm = qemu_vm(disks=[("vda", "8M")])
    target = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "8M"], check=True)
    with vm.monitor() as client:
        guest_write(client, vm, "vda", "write -P 0x5a 0 1M")
        client.execute("blockdev-add", {"driver": "qcow2", "node-name": "target",
                                        "file": {"driver": "file", "filename": str(target)}})
        client.execute("blockdev-backup", {"job-id": "job0", "device": vm.disks["vda"].node, "target": "target",
                                           "sync": "full"})
        done = client.wait_event("BLOCK_JOB_COMPLETED", timeout=30, match={"device": "job0", "type": "backup"})
        assert done.data["offset"] == done.data["len"] == 8 * MiB and "error" not in done.data
        assert done.timestamp == pytest.approx(time.time(), abs=60)
        client.wait_event("JOB_STATUS_CHANGE", timeout=10, match={"id": "job0", "status": "null"})
        statuses = [e.data["status"] for e in client.events("JOB_STATUS_CHANGE") if e.data["id"] == "job0"]
        assert statuses[0] == "created" and "running" in statuses and "concluded" in statuses
        assert client.events("JOB_STATUS_CHANGE") == []  # taken
        client.execute("blockdev-del", {"node-name": "target"})
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", str(target)],
                          capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in read.stdout


def test_waiting_for_an_event_that_does_not_come_times_out_and_the_session_goes_on(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as client:
        started = time.monotonic()
        with pytest.raises(QmpError, match=r"did not send a BLOCK_JOB_COMPLETED event .*within 0.3 s"):
            client.wait_event("BLOCK_JOB_COMPLETED", timeout=0.3, match={"device": "job9"})
        assert time.monotonic() - started < 2
        client.execute("cont")
        client.execute("stop")
        assert client.wait_event("STOP", timeout=5).name == "STOP"
        assert [e.name for e in client.events()] == ["RESUME"]


def test_a_second_client_on_a_busy_monitor_is_told_so_quickly(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as first:
        started = time.monotonic()
        with pytest.raises(QmpError) as caught:
            QmpClient.connect(vm.qmp_path, timeout=1)
        assert time.monotonic() - started < 3
        assert str(caught.value) == (f"QEMU's monitor at {vm.qmp_path} did not answer within 1 s; "
                                     "is another client connected to it?")
        assert caught.value.hint is not None and "second -qmp socket" in caught.value.hint
        with QmpClient.connect(vm.hozon_qmp_path, timeout=5) as hozon:  # Hozon's own monitor answers
            assert hozon.execute("query-status")["status"] == "prelaunch"
        assert first.execute("query-status")["status"] == "prelaunch"
    with QmpClient.connect(vm.qmp_path, timeout=5) as again:  # free again once the first client left
        assert again.execute("query-status")["status"] == "prelaunch"


def test_qemu_killed_between_commands_gives_a_clear_error(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as client:
        assert client.execute("query-status")["running"] is False
        vm.kill()
        with pytest.raises(QmpError) as caught:
            client.execute("query-status", timeout=5)
        assert not isinstance(caught.value, QmpCommandError)
        assert f"QEMU's monitor at {vm.qmp_path} closed the connection" in str(caught.value)
        assert "did QEMU quit?" in str(caught.value)
        with pytest.raises(QmpError, match="is gone"):
            client.execute("query-status")


def test_qemu_killed_while_a_client_waits_gives_a_clear_error_at_once(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    with vm.monitor() as client:
        killer = threading.Timer(0.3, vm.kill)
        killer.start()
        started = time.monotonic()
        try:
            with pytest.raises(QmpError, match=r"closed the connection while Hozon waited for a SHUTDOWN event"):
                client.wait_event("SHUTDOWN", timeout=30)
        finally:
            killer.join()
        assert time.monotonic() - started < 5


def test_quit_answers_then_the_monitor_goes_away(qemu_vm: QemuVmFactory) -> None:
    vm = qemu_vm()
    client = vm.monitor()
    assert client.execute("quit") == {}
    assert vm.wait(10) == 0
    assert [e.name for e in client.events()] == ["SHUTDOWN"]  # still readable after QEMU has gone
    with pytest.raises(QmpError, match="did QEMU quit"):
        client.execute("query-status")
    client.close()
    with pytest.raises(QmpError, match=f"there is no QEMU monitor socket at {vm.qmp_path}"):
        QmpClient.connect(vm.qmp_path)
