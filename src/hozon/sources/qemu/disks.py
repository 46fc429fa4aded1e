"""The disks of a running VM and the dirty bitmaps on them, as QEMU's monitor reports them.

A *disk* is a guest device with writable media: ``query-block`` lists the device, and its format
node (``query-named-block-nodes``) holds the image and the dirty bitmaps. A device's top node can
be a filter that QEMU inserted above the format node (a backup job's ``copy-before-write``, a
``throttle`` or ``copy-on-read`` node, …); :func:`list_disks` looks through it, because bitmaps
belong on the format node and a filter comes and goes.

Names: a disk is named by its device's qdev id (``-device …,id=vda`` → ``vda``); a device without
an id is named by its legacy drive (``-drive if=virtio`` → ``virtio0``), or by its node name when
it has neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from hozon.errors import QmpCommandError, QmpError
from hozon.sources.qemu.qmp import QmpClient

# Drivers that pass I/O through to one child and hold no image of their own.
FILTER_DRIVERS: Final = frozenset({
    "copy-before-write", "copy-on-read", "throttle", "preallocate", "compress", "mirror_top", "commit_top",
    "blkdebug", "blkverify", "blklogwrites", "blkreplay",
})
_PERIPHERAL: Final = "/machine/peripheral/"


@dataclass(frozen=True)
class Disk:
    """One writable disk of a VM.

    ``name`` is the device's qdev id (or, without one, the drive or node name QMP shows); ``node``
    the node name of the format node the device reads (the top of its backing chain), ``filename``
    that node's image file, ``format`` its driver ("qcow2", "raw", …) and ``size`` its virtual size
    in bytes.
    """

    name: str
    node: str
    filename: str
    format: str
    size: int


@dataclass(frozen=True)
class Bitmap:
    """A named dirty bitmap on a node, as ``query-named-block-nodes`` describes it.

    ``recording``: it marks new writes; ``busy``: an operation (an NBD export, a job) holds it and
    it cannot be changed or removed; ``persistent``: stored in the image when QEMU closes it;
    ``inconsistent``: QEMU did not close the image cleanly, so the bitmap cannot be trusted (drop it
    and read the whole disk next time); ``granularity`` in bytes.
    """

    name: str
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    granularity: int


def list_disks(qmp: QmpClient) -> list[Disk]:
    """The VM's writable disks with media, ordered by name.

    CD-ROM drives (devices with a tray), empty drives, read-only drives and drives attached to no
    device are left out.
    """
    nodes = block_nodes(qmp)
    graph: dict[str, Any] | None = None
    disks: dict[str, Disk] = {}
    for block in _list(qmp.execute("query-block"), "query-block"):
        inserted = block.get("inserted")
        qdev = str(block.get("qdev") or "")
        if not isinstance(inserted, dict) or not qdev or "tray_open" in block or inserted.get("ro", False):
            continue
        top = str(inserted.get("node-name") or "")
        node = top
        if str(inserted.get("drv", "")) in FILTER_DRIVERS:
            if graph is None:
                graph = _block_graph(qmp)
            node = _below_filters(top, nodes, graph)
        info = nodes.get(node)
        if info is None:
            raise QmpError(f"QEMU lists the node {node!r} of device {qdev} in query-block but not in "
                           "query-named-block-nodes")
        name = _disk_name(qdev, str(block.get("device") or ""), node)
        if name in disks:
            raise QmpError(f"two disks of the VM would both be named {name!r} (devices {disks[name].node} and "
                           f"{node}); give the devices distinct ids")
        image = info.get("image")
        image = image if isinstance(image, dict) else {}
        disks[name] = Disk(
            name=name,
            node=node,
            filename=str(image.get("filename") or info.get("file") or ""),
            format=str(info.get("drv", "")),
            size=int(image.get("virtual-size", 0)),
        )
    return [disks[name] for name in sorted(disks)]


def bitmaps(qmp: QmpClient, disk: Disk) -> dict[str, Bitmap]:
    """The named dirty bitmaps on ``disk``'s node, by name (QEMU's own unnamed ones left out)."""
    info = block_nodes(qmp).get(disk.node)
    if info is None:
        raise QmpError(f"disk {disk.name} of the VM has no node {disk.node} any more; was it unplugged?")
    return node_bitmaps(info)


# -- shared with fleece.py -----------------------------------------------------------------------


def block_nodes(qmp: QmpClient) -> dict[str, dict[str, Any]]:
    """Every named block node (``query-named-block-nodes``, flat), by node name."""
    nodes: dict[str, dict[str, Any]] = {}
    for info in _list(qmp.execute("query-named-block-nodes", {"flat": True}), "query-named-block-nodes"):
        name = info.get("node-name")
        if isinstance(name, str) and name:
            nodes[name] = info
    return nodes


def node_bitmaps(info: Mapping[str, Any]) -> dict[str, Bitmap]:
    """The named bitmaps in one ``query-named-block-nodes`` entry."""
    found: dict[str, Bitmap] = {}
    for raw in info.get("dirty-bitmaps") or []:
        if not isinstance(raw, dict) or not raw.get("name"):
            continue  # unnamed: QEMU's own (a backup job's copy-before-write map)
        name = str(raw["name"])
        found[name] = Bitmap(
            name=name,
            recording=bool(raw.get("recording", False)),
            busy=bool(raw.get("busy", False)),
            persistent=bool(raw.get("persistent", False)),
            inconsistent=bool(raw.get("inconsistent", False)),
            granularity=int(raw.get("granularity", 0)),
        )
    return found


# -- internals -----------------------------------------------------------------------------------


def _disk_name(qdev: str, device: str, node: str) -> str:
    if not qdev.startswith("/"):
        return qdev  # the device's id, as QEMU shows it for devices that own their drive (ide-hd, scsi-hd)
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL):].split("/", 1)[0]  # /machine/peripheral/vda/virtio-backend
    return device or node  # a device without an id: its legacy drive's name, else the node's


def _block_graph(qmp: QmpClient) -> dict[str, Any] | None:
    """QEMU's block graph (nodes and edges), or None if this QEMU does not offer the debug command."""
    try:
        graph = qmp.execute("x-debug-query-block-graph")
    except QmpCommandError:
        return None
    return graph if isinstance(graph, dict) else None


def _below_filters(top: str, nodes: Mapping[str, Mapping[str, Any]], graph: Mapping[str, Any] | None) -> str:
    """The first node below ``top`` that is not a filter, following each filter's filtered child."""
    node = top
    for _ in range(16):
        info = nodes.get(node)
        if info is None or str(info.get("drv", "")) not in FILTER_DRIVERS:
            return node
        child = _filtered_child(node, info, nodes, graph)
        if child is None:
            return node
        node = child
    return node


def _filtered_child(node: str, info: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]],
                    graph: Mapping[str, Any] | None) -> str | None:
    if graph is not None:
        ids = {n.get("id"): n.get("name") for n in graph.get("nodes", []) if isinstance(n, dict)}
        parent = next((i for i, name in ids.items() if name == node), None)
        edges = [e for e in graph.get("edges", []) if isinstance(e, dict) and e.get("parent") == parent]
        for role in ("file", "backing"):
            for edge in edges:
                if edge.get("name") == role and isinstance(ids.get(edge.get("child")), str):
                    return str(ids[edge.get("child")])
    # Without the graph: a filter shows its child's file name; the non-filter node with that name.
    candidates = [name for name, other in nodes.items()
                  if name != node and other.get("file") == info.get("file")
                  and str(other.get("drv", "")) not in FILTER_DRIVERS and other.get("drv") != "file"]
    return candidates[0] if len(candidates) == 1 else None


def _list(value: Any, command: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise QmpError(f"QEMU answered {command} with {type(value).__name__}, not a list")
    return [item for item in value if isinstance(item, dict)]
