"""Defining a restored VM in libvirt from the definition its snapshot kept (``--libvirt-define NAME``).

The saved definition (``extra["domain_xml"]``) is changed into one for a *copy* that can live
beside the original:

- ``<name>`` becomes NAME and ``<uuid>`` is dropped: libvirt gives the copy a new UUID (two
  domains cannot share one);
- each disk that was restored (matched by its target, ``vda``, the name the snapshot gives it)
  becomes a plain file disk on the restored image, with that image's format; what tied it to the
  old storage goes (``<backingStore>``, ``<auth>``, ``<encryption>``, a network or volume source);
- every ``<mac address>`` is dropped, so libvirt gives each interface a new one. A copy defined
  next to a running original must not share its MAC addresses (the two would steal each other's
  traffic and DHCP lease); a VM brought back after the original is gone can take its old
  addresses from ``domain.xml`` in the restore directory (``virsh edit``).
- the UEFI variable store path (``<nvram>``) is dropped: it is the original's file, which the
  copy must not write; libvirt makes the copy a fresh one from the firmware's template.

Disks of the definition that the snapshot does not hold (read-only disks, CD-ROMs) are left as they
were, and disks the snapshot holds that the definition lacks (attached to the running VM only) are
restored but not attached: both are reported as notes.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from hozon.errors import HozonError, UsageError
from hozon.sources.libvirt.domain import exists
from hozon.sources.libvirt.virsh import Virsh, VirshFailed

_DISK_DEVICES = ("disk", "lun")
_DROPPED_FROM_DISK = ("backingStore", "auth", "encryption", "mirror", "reservations")


@dataclass(frozen=True)
class RestoredDisk:
    """A restored image: ``name`` is the disk's name in the snapshot (its libvirt target)."""

    name: str
    path: str
    format: str


@dataclass(frozen=True)
class Defined:
    name: str
    uuid: str
    xml: str
    notes: list[str]


def saved_definition(extra: Mapping[str, object], snapshot: str) -> str:
    """The libvirt definition an image snapshot kept, or a clear error when it kept none."""
    xml = extra.get("domain_xml")
    if not isinstance(xml, str) or not xml.strip():
        raise UsageError(f"snapshot {snapshot} holds no libvirt definition",
                         hint="only backups taken with --libvirt DOMAIN keep one; restore the images without "
                              "--libvirt-define")
    return xml


def check_name_free(name: str, uri: str | None = None) -> None:
    """Fail before anything is restored if libvirt already has a domain called ``name``."""
    virsh = Virsh(uri)
    if not name or "/" in name:
        raise UsageError(f"{name!r} cannot name a libvirt domain")
    if exists(virsh, name):
        raise HozonError(f"{virsh.where()} already has a domain named {name}",
                         hint="choose another name for the restored VM")


def copy_definition(domain_xml: str, name: str, disks: list[RestoredDisk]) -> tuple[str, list[str]]:
    """The definition of a copy called ``name`` whose disks are the restored images; notes for the user."""
    root = parse_domain(domain_xml)
    rename(root, name, "restored copy")
    notes = point_disks_at(root, disks)
    for interface in root.iterfind("devices/interface"):
        for mac in interface.findall("mac"):
            interface.remove(mac)
    notes += drop_nvram(root)
    return format_domain(root), notes


def define_copy(domain_xml: str, name: str, disks: list[RestoredDisk], uri: str | None = None) -> Defined:
    """Define the copy in libvirt (``virsh define``); it is not started."""
    xml, notes = copy_definition(domain_xml, name, disks)
    virsh = Virsh(uri)
    fd, path = tempfile.mkstemp(prefix="hozon-domain-", suffix=".xml")  # 0600: it may hold passwords
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(xml)
        virsh.run(["define", "--file", path], f"define domain {name}")
    except VirshFailed as exc:
        raise HozonError(f"libvirt could not define the restored VM {name}: {exc.detail}",
                         hint="the images are restored; define the VM by hand from the domain.xml beside them "
                              "(virsh define)") from None
    finally:
        os.unlink(path)
    uuid = virsh.run(["domuuid", "--", name], f"look up domain {name}").strip()
    notes += reachability_notes(disks)
    return Defined(name, uuid, xml, notes)


def parse_domain(domain_xml: str) -> ET.Element:
    """The ``<domain>`` element of a definition a snapshot kept, its namespace prefixes registered."""
    for prefix, uri in _namespaces(domain_xml).items():
        ET.register_namespace(prefix, uri)  # keep <qemu:commandline> and <metadata> prefixes as they were
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise HozonError(f"the libvirt definition in the snapshot is not well-formed XML: {exc}") from None
    if root.tag != "domain":
        raise HozonError(f"the libvirt definition in the snapshot is a <{root.tag}>, not a <domain>")
    return root


def rename(root: ET.Element, name: str, what: str) -> None:
    """Call the domain ``name``, without UUID (libvirt gives it a new one); its title says it is ``what``."""
    element = root.find("name")
    if element is None:
        element = ET.SubElement(root, "name")
    element.text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    for title in root.findall("title"):
        title.text = f"{title.text or ''} ({what})".strip()


def format_domain(root: ET.Element) -> str:
    out = io.StringIO()
    ET.ElementTree(root).write(out, encoding="unicode")
    return out.getvalue() + "\n"


def point_disks_at(root: ET.Element, disks: list[RestoredDisk]) -> list[str]:
    """Point each disk of the definition that was restored at its image; notes on the disks that do not match."""
    notes: list[str] = []
    restored = {d.name: d for d in disks}
    attached: set[str] = set()
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        image = restored.get(dev)
        if image is None or disk.get("device", "disk") not in _DISK_DEVICES:
            if disk.get("device", "disk") in _DISK_DEVICES:
                notes.append(f"disk {dev or '(no target)'} is not in the snapshot; the copy uses it as the "
                             "original does")
            continue
        _point_at(disk, image)
        attached.add(dev)
    for image in disks:
        if image.name not in attached:
            notes.append(f"disk {image.name} was restored to {image.path} but the definition has no disk with "
                         f"target {image.name} (attached to the running VM only?); attach it with virsh attach-disk")
    return notes


def drop_nvram(root: ET.Element) -> list[str]:
    """Drop the original's UEFI variable store: a copy must not write it (libvirt makes a fresh one)."""
    notes: list[str] = []
    for os_element in root.findall("os"):
        for nvram in os_element.findall("nvram"):
            os_element.remove(nvram)
            notes.append("the UEFI variables of the original are not in the snapshot; the copy starts with "
                         "fresh ones from the firmware's template")
    return notes


def reachability_notes(disks: list[RestoredDisk]) -> list[str]:
    """A note when QEMU, running as its own user, could not reach the images' directory."""
    notes: list[str] = []
    for directory in sorted({os.path.dirname(d.path) for d in disks}):
        path = directory
        while True:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH:
                notes.append(f"{path} is closed to other users: QEMU running as its own user (libvirt's "
                             f"qemu:///system) cannot reach the images in {directory}")
                break
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return notes


# -- internals -----------------------------------------------------------------------------------


def _point_at(disk: ET.Element, image: RestoredDisk) -> None:
    """Make ``disk`` a plain file disk on ``image``."""
    disk.set("type", "file")
    if disk.get("device") == "lun":  # a SCSI passthrough LUN needs a block device; a file is a disk
        disk.set("device", "disk")
    for tag in _DROPPED_FROM_DISK:
        for element in disk.findall(tag):
            disk.remove(element)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", image.format)
    source = disk.find("source")
    new_source = ET.Element("source", {"file": image.path})
    if source is None:
        disk.insert(list(disk).index(driver) + 1, new_source)
    else:
        new_source.tail = source.tail
        disk.insert(list(disk).index(source), new_source)
        disk.remove(source)


def _namespaces(xml: str) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
            if prefix:
                found[prefix] = uri
    except ET.ParseError:
        pass  # reported by the real parse
    return found
