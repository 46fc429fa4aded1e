"""Resuming a libvirt checkpoint: libvirt's own save image, made from the checkpoint, and ``virsh restore``.

A checkpoint of a libvirt domain keeps no QEMU command line (libvirt builds it, with file
descriptors and sockets of its own), but libvirt resumes a saved domain from a *save image*, the
file ``virsh save`` writes. Its layout is stable ABI (libvirt's ``src/qemu/qemu_saveimage.h``),
little-endian on x86::

    magic         16 bytes  "LibvirtQemudSave"
    version       uint32    2
    data_len      uint32    bytes of domain XML that follow, NUL and spare room included
    was_running   uint32    1: libvirt runs the guest once the state is loaded
    format        uint32    0: the state is not compressed
    cookie_offset uint32    0: no cookie (libvirt's CPU details; the XML holds the CPU)
    unused        14 × uint32, zero
    domain XML, NUL, zeros up to data_len
    QEMU's migration stream, as QEMU wrote it (the checkpoint's state)

Hozon writes the header and XML in front of the state stream, with the XML's disks pointed at the
restored images. libvirt reads the file only front to back, so it may be a FIFO that Hozon feeds
from the repository (``hozon vm memory``): no file of the memory's size.

The XML is the running domain's migratable description (``running_xml``; older checkpoints
have only the definition). How it is changed depends on what the resumed VM is for:

- :func:`resume_definition` — the VM itself, or a copy of it beside the original
  (``--as NAME``: another name, a new UUID, its network links down, its UEFI variables fresh);
- :func:`inspection_definition` — a throwaway copy that only loads the state, for
  ``hozon vm memory``: blank disks, no network, consoles and channels to nowhere, no display.

Devices stay as they were either way: the state only loads into the same devices.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Final

from hozon.errors import HozonError
from hozon.sources.libvirt.define import (
    RestoredDisk,
    drop_nvram,
    format_domain,
    parse_domain,
    point_disks_at,
    rename,
)
from hozon.sources.libvirt.virsh import Virsh, VirshFailed

MAGIC: Final = b"LibvirtQemudSave"
VERSION: Final = 2
FORMAT_RAW: Final = 0
HEADER: Final = struct.Struct("<16sIIIII56x")  # 92 bytes
RESTORE_TIMEOUT: Final = 600.0  # libvirt returns once QEMU has loaded the whole state
XML_ROOM: Final = 64 * 1024  # spare room after the XML, as libvirt leaves it, for virsh save-image-edit

_CHARDEVS = ("serial", "parallel", "console", "channel")
_BACKEND_OF_INTERFACE = ("source", "target", "virtualport", "bandwidth", "tune", "script", "backend", "ip",
                         "route", "vlan", "port", "filterref", "teaming")


def save_header(domain_xml: str, was_running: bool) -> bytes:
    """What goes in front of the state stream: libvirt's header and the domain XML."""
    xml = domain_xml.encode() + b"\0"
    data_len = len(xml) + XML_ROOM
    return HEADER.pack(MAGIC, VERSION, data_len, int(was_running), FORMAT_RAW, 0) + xml + bytes(XML_ROOM)


def identity(domain_xml: str) -> tuple[str, str]:
    """The (name, UUID) a description gives the domain."""
    root = parse_domain(domain_xml)
    return (root.findtext("name") or "").strip(), (root.findtext("uuid") or "").strip()


def resume_definition(domain_xml: str, disks: list[RestoredDisk], copy_name: str | None = None,
                      directory: str = ".") -> tuple[str, list[str]]:
    """The description that resumes the checkpoint on the restored images; notes for the user.

    With ``copy_name`` it is a copy that can run beside the original. The files and sockets of its
    serial ports, consoles and channels move into ``directory`` and its displays take free ports.
    It keeps the MAC addresses (they are part of the saved device state, which the guest keeps
    using), so its network links start down; ``virsh domif-setlink`` brings them up.
    """
    root = parse_domain(domain_xml)
    notes = point_disks_at(root, disks)
    if copy_name is None:
        return format_domain(root), notes
    rename(root, copy_name, "copy of a checkpoint")
    _move_chardevs(root, Path(directory), copy_name)
    for graphics in root.iterfind("devices/graphics"):
        if graphics.get("autoport") == "no":
            graphics.set("autoport", "yes")
            for attribute in ("port", "tlsPort", "websocket"):
                graphics.attrib.pop(attribute, None)
    interfaces = root.findall("devices/interface")
    for interface in interfaces:
        _link_down(interface)
    if interfaces:
        notes.append(f"the copy {copy_name} has the original's MAC addresses (the saved device state holds them), "
                     "so its network links are down; bring one up with: virsh domif-setlink "
                     f"{copy_name} INTERFACE up")
    notes += drop_nvram(root)
    return format_domain(root), notes


def inspection_definition(domain_xml: str, name: str, blanks: list[RestoredDisk]) -> str:
    """A copy called ``name`` that loads the state and touches nothing of the original.

    Its disks are the blank images ``blanks``, its NICs have user-mode backends with the link down,
    its serial ports, consoles and channels go nowhere, it has no display, and its UEFI variables
    are fresh.
    """
    root = parse_domain(domain_xml)
    rename(root, name, "copy of a checkpoint")
    point_disks_at(root, blanks)
    drop_nvram(root)
    devices = root.find("devices")
    if devices is None:
        return format_domain(root)
    for interface in devices.findall("interface"):
        interface.set("type", "user")
        for child in list(interface):
            if child.tag in _BACKEND_OF_INTERFACE:
                interface.remove(child)
        driver = interface.find("driver")
        if driver is not None:
            driver.attrib.pop("name", None)  # vhost and friends are tap backends
        _link_down(interface)
    for chardev in [d for d in devices if d.tag in _CHARDEVS]:
        chardev.set("type", "null")
        for child in list(chardev):
            if child.tag in ("source", "protocol", "log"):
                chardev.remove(child)
    for graphics in devices.findall("graphics"):
        devices.remove(graphics)
    return format_domain(root)


def _move_chardevs(root: ET.Element, directory: Path, name: str) -> None:
    """Give the copy's file and socket character devices paths of its own in ``directory``.

    A console that shows the first serial port names the same file: it gets the same new path.
    """
    moved: dict[str, str] = {}
    devices = root.find("devices")
    for chardev in [d for d in devices if d.tag in _CHARDEVS] if devices is not None else []:
        source = chardev.find("source")
        path = source.get("path") if source is not None else None
        if source is None or not path or chardev.get("type") not in ("file", "unix", "pipe"):
            continue
        if path not in moved:
            suffix = ".log" if chardev.get("type") == "file" else ".sock"
            moved[path] = str(directory.absolute() / f"{name}-{chardev.tag}{len(moved)}{suffix}")
        source.set("path", moved[path])


def _link_down(interface: ET.Element) -> None:
    for link in interface.findall("link"):
        interface.remove(link)
    ET.SubElement(interface, "link", {"state": "down"})


def check_resumable(virsh: Virsh, name: str, uuid: str) -> bool:
    """Fail unless libvirt can resume a domain ``name`` with ``uuid`` now; whether it will be persistent.

    A stopped domain of that name and UUID takes the resumed state (it stays defined as it was);
    a running one, or another domain of that name, makes libvirt refuse: say so before anything
    is written.
    """
    state = state_of(virsh, uuid) if uuid else None
    if state is not None:
        if state != "shut off":
            raise HozonError(f"domain {name} is {state} in {virsh.where()}; a checkpoint resumes only into a "
                             "stopped domain",
                             hint=f"stop it first (virsh destroy {name}), or resume a copy beside it with --as NAME")
        return True
    if state_of(virsh, name) is not None:
        raise HozonError(f"{virsh.where()} has another domain named {name}",
                         hint="resume the checkpoint as a copy with --as NAME")
    return False


def restore_args(path: str, paused: bool | None) -> list[str]:
    """``virsh restore PATH``: paused, running, or (None) as the VM was when the checkpoint was taken."""
    return ["restore", path, *([] if paused is None else ["--paused" if paused else "--running"])]


def restore(virsh: Virsh, path: str, paused: bool, what: str) -> None:
    """Resume the save image at ``path`` (a file or a FIFO); returns once QEMU has loaded the state."""
    virsh.run(restore_args(path, paused), what, timeout=RESTORE_TIMEOUT)


def state_of(virsh: Virsh, domain: str) -> str | None:
    """A domain's state ("running", "paused", "shut off", …), looked up by name or UUID; None if there is none."""
    try:
        return virsh.run(["domstate", "--", domain], f"look up domain {domain}").strip()
    except VirshFailed as exc:
        if exc.no_domain:
            return None
        raise
