"""Disks, bitmaps and fleecing against a scripted monitor: naming rules and the cleanup's resilience.

The real behaviour is tested against QEMU in tests/e2e/test_fleece_qemu.py; here a fake QMP client
answers from canned replies, so the odd cases (filters without the debug graph, commands that fail
during cleanup) are cheap to reach.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from hozon.sources.qemu import Disk, PointInTime, QmpCommandError, QmpError, bitmaps, cleanup_leftovers, list_disks
from hozon.sources.qemu import fleece as fleece_module

MiB = 1024 * 1024


class FakeQmp:
    """Answers each command from ``replies`` (a value, or a callable of the arguments)."""

    def __init__(self, replies: Mapping[str, Any]) -> None:
        self.replies = dict(replies)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        self.calls.append((command, dict(arguments or {})))
        reply = self.replies.get(command, {})
        if isinstance(reply, BaseException):
            raise reply
        return reply(dict(arguments or {})) if callable(reply) else reply

    def transaction(self, actions: Any, properties: Any = None, timeout: float | None = None) -> None:
        self.execute("transaction", {"actions": actions})

    def wait_event(self, name: str, timeout: float | None = None, match: Any = None) -> Any:
        raise QmpError("no events here")

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]


def block(qdev: str, node: str | None, device: str = "", drv: str = "qcow2", ro: bool = False,
          tray: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "qdev": qdev}
    if node is not None:
        info["inserted"] = {"node-name": node, "drv": drv, "ro": ro}
    if tray:
        info["tray_open"] = False
    return info


def node(name: str, drv: str = "qcow2", file: str = "", size: int = MiB, bitmaps: Any = None) -> dict[str, Any]:
    info: dict[str, Any] = {"node-name": name, "drv": drv, "file": file or f"/img/{name}",
                            "image": {"filename": file or f"/img/{name}", "virtual-size": size}}
    if bitmaps is not None:
        info["dirty-bitmaps"] = bitmaps
    return info


NODES = [
    node("vda-format", file="/img/vda.qcow2", size=64 * MiB),
    node("#block1", drv="raw", file="/img/cd.iso"),
    node("#block2", drv="qcow2", file="/img/anon.qcow2"),
    node("#block3", drv="qcow2", file="/img/anon2.qcow2"),
    node("sda-format", file="/img/sda.qcow2"),
]
BLOCKS = [
    block("/machine/peripheral/vda/virtio-backend", "vda-format"),
    block("cdrom", "#block1", device="cd0", ro=True, tray=True),
    block("cdrom2", None, device="empty0", tray=True),
    block("/machine/peripheral-anon/device[0]/virtio-backend", "#block2", device="virtio0"),
    block("/machine/peripheral-anon/device[1]/virtio-backend", "#block3"),
    block("sda", "sda-format"),  # a device that owns its drive shows its id
    block("", "vda-format", device="unattached"),  # a drive no device uses
    block("/machine/peripheral/vdro/virtio-backend", "vda-format", ro=True),
]


def test_disks_are_named_by_device_id_then_drive_then_node_and_sorted() -> None:
    qmp = FakeQmp({"query-block": BLOCKS, "query-named-block-nodes": NODES})
    disks = list_disks(qmp)  # type: ignore[arg-type]
    assert [(d.name, d.node, d.filename, d.format, d.size) for d in disks] == [
        ("#block3", "#block3", "/img/anon2.qcow2", "qcow2", MiB),
        ("sda", "sda-format", "/img/sda.qcow2", "qcow2", MiB),
        ("vda", "vda-format", "/img/vda.qcow2", "qcow2", 64 * MiB),
        ("virtio0", "#block2", "/img/anon.qcow2", "qcow2", MiB),
    ]


@pytest.mark.parametrize("graph", [True, False])
def test_a_filter_above_the_disk_is_looked_through(graph: bool) -> None:
    nodes = [node("#block9", drv="copy-before-write", file="/img/vda.qcow2"),
             node("vda-format", file="/img/vda.qcow2"), node("vda-file", drv="file", file="/img/vda.qcow2"),
             node("hozon-fleece-vda", file="json:{}")]
    replies: dict[str, Any] = {
        "query-block": [block("/machine/peripheral/vda/virtio-backend", "#block9", drv="copy-before-write")],
        "query-named-block-nodes": nodes,
        "x-debug-query-block-graph": QmpCommandError("x-debug-query-block-graph", "CommandNotFound", "no"),
    }
    if graph:
        replies["x-debug-query-block-graph"] = {
            "nodes": [{"id": 1, "name": "#block9"}, {"id": 2, "name": "vda-format"}, {"id": 3, "name": "vda-file"},
                      {"id": 4, "name": "hozon-fleece-vda"}],
            "edges": [{"parent": 1, "child": 4, "name": "target"}, {"parent": 1, "child": 2, "name": "file"},
                      {"parent": 2, "child": 3, "name": "file"}],
        }
    disks = list_disks(FakeQmp(replies))  # type: ignore[arg-type]
    assert [(d.name, d.node) for d in disks] == [("vda", "vda-format")]


def test_bitmaps_leave_out_unnamed_ones_and_default_missing_flags() -> None:
    raw = [{"name": "hozon-1", "recording": True, "busy": False, "persistent": True, "granularity": 65536},
           {"recording": False, "busy": False, "persistent": False, "granularity": 65536, "count": 1},
           {"name": "old", "recording": True, "busy": False, "persistent": True, "inconsistent": True,
            "granularity": 131072}]
    qmp = FakeQmp({"query-named-block-nodes": [node("vda-format", bitmaps=raw)]})
    found = bitmaps(qmp, Disk("vda", "vda-format", "/img/vda", "qcow2", MiB))  # type: ignore[arg-type]
    assert set(found) == {"hozon-1", "old"}
    assert not found["hozon-1"].inconsistent and found["old"].inconsistent and found["old"].granularity == 131072
    with pytest.raises(QmpError, match="has no node gone"):
        bitmaps(qmp, Disk("vdb", "gone", "/img/vdb", "qcow2", MiB))  # type: ignore[arg-type]


def test_fleece_names_fit_qemus_node_name_limit() -> None:
    assert fleece_module._fleece_names("vda") == ("hozon-fleece-vda", "hozon-scratch-vda")
    long_name, scratch = fleece_module._fleece_names("a-very-long-device-identifier")
    odd, _ = fleece_module._fleece_names("#block3")
    assert long_name.startswith("hozon-fleece-h") and len(scratch) <= 31 and len(long_name) <= 31
    assert odd.startswith("hozon-fleece-h") and odd != long_name
    assert fleece_module._file_safe("../a b/c") == "_a_b_c"


def test_misuse_is_refused_before_anything_happens(tmp_path: Path) -> None:
    qmp: Any = FakeQmp({})
    vda = Disk("vda", "vda-format", "/img/vda", "qcow2", MiB)
    for args, message in [(([], "b"), "at least one disk"), (([vda, vda], "b"), "distinct"),
                          (([vda], ""), "not be empty")]:
        with pytest.raises(ValueError, match=message):
            PointInTime(qmp, args[0], tmp_path, args[1])
    with pytest.raises(ValueError, match="not backed up"):
        PointInTime(qmp, [vda], tmp_path, "b", since={"vdb": "a"})
    with pytest.raises(ValueError, match="clashes"):
        PointInTime(qmp, [vda], tmp_path, "b", since={"vda": "b"})
    with pytest.raises(ValueError, match="non-empty"):
        cleanup_leftovers(qmp, "")
    assert qmp.calls == []


def refuse(command: str, desc: str) -> Callable[[dict[str, Any]], Any]:
    def reply(arguments: dict[str, Any]) -> Any:
        raise QmpCommandError(command, "GenericError", desc)
    return reply


def stuck_on_vda(arguments: dict[str, Any]) -> Any:
    if arguments["node-name"].endswith("vda"):
        raise QmpCommandError("blockdev-del", "GenericError", "Node x is stuck")
    return {}


def test_cleanup_goes_on_past_failures_and_reports_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleece_module, "CLEANUP_WAIT", 0.0)
    disks = [Disk("vda", "vda-format", "/img/vda", "qcow2", MiB), Disk("vdb", "vdb-format", "/img/vdb", "qcow2", MiB)]
    qmp = FakeQmp({
        "query-named-block-nodes": [node("vda-format"), node("vdb-format")],
        "query-block-exports": [], "query-block-jobs": [],
        "block-export-del": refuse("block-export-del", "Export 'hozon-fleece-vdb' is not found"),  # already gone
        "blockdev-del": stuck_on_vda,
    })
    monkeypatch.setattr(fleece_module.PointInTime, "_create_scratch",
                        lambda self, path, size: (self._scratch.append(path), path.write_bytes(b"x")))
    pit = PointInTime(qmp, disks, tmp_path, "hozon-2")  # type: ignore[arg-type]
    with pytest.raises(KeyError) as caught, pit:
        raise KeyError("boom")
    assert pit.cleanup_failures == ["delete node hozon-fleece-vda: Node x is stuck"]
    assert "delete node hozon-fleece-vda" in caught.value.__notes__[0]
    commands = qmp.commands()
    assert commands.count("blockdev-del") == 2 and commands.count("block-job-cancel") == 2
    assert commands.count("block-dirty-bitmap-remove") == 2 and "nbd-server-stop" in commands
    assert list(tmp_path.iterdir()) == []  # scratch files go whatever QEMU said
