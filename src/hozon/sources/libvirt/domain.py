"""A libvirt domain as Hozon sees it: its live description and its definition.

The *live* XML (``virsh dumpxml DOMAIN``) says what runs now: the domain's UUID, whether it runs,
each disk's device alias (the qdev id QEMU knows it by: ``virtio-disk0``) and target
(``vda``, the name an administrator knows it by), and the user QEMU runs as (the DAC label).

The *definition* Hozon keeps with a snapshot is the persistent XML with its secrets
(``virsh dumpxml --inactive --security-info``): what ``virsh define`` takes to make the domain
again. Live-only state (aliases, PCI addresses libvirt assigned at start, runtime ports) is not in
it, and neither are changes made to the running VM only; the secrets (a VNC or SPICE password) are
kept because a VM restored without them would come back with an open console. The snapshot is
encrypted like everything else in the repository.
"""

from __future__ import annotations

import grp
import pwd
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from hozon.errors import HozonError
from hozon.sources.libvirt.virsh import Virsh, VirshFailed


@dataclass(frozen=True)
class DomainInfo:
    """What the live XML of a domain says.

    ``qemu_owner`` is the (uid, gid) QEMU runs as according to libvirt's DAC label, or None when
    libvirt gives none (``qemu:///session``: QEMU runs as the caller). ``disk_targets`` maps each
    disk's alias (its qdev id) to its target device (``virtio-disk0`` → ``vda``).
    """

    name: str
    uuid: str
    running: bool
    qemu_owner: tuple[int, int] | None
    disk_targets: dict[str, str] = field(default_factory=dict)


def describe(virsh: Virsh, domain: str) -> DomainInfo:
    """The live description of ``domain`` (a name, id or UUID)."""
    try:
        text = virsh.run(["dumpxml", "--", domain], f"describe domain {domain}")
    except VirshFailed as exc:
        if exc.no_domain:
            raise HozonError(f"{virsh.where()} has no domain {domain!r}",
                             hint="list the domains with: virsh list --all") from None
        raise
    return parse_live_xml(text, domain)


def parse_live_xml(text: str, domain: str = "") -> DomainInfo:
    root = _parse(text, f"the description of domain {domain}")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip()
    if not name or not uuid:
        raise HozonError(f"libvirt described domain {domain} without a name or UUID")
    targets: dict[str, str] = {}
    for disk in root.iterfind("devices/disk"):
        alias = disk.find("alias")
        target = disk.find("target")
        if alias is not None and target is not None and alias.get("name") and target.get("dev"):
            targets[str(alias.get("name"))] = str(target.get("dev"))
    return DomainInfo(name=name, uuid=uuid, running=root.get("id") not in (None, "-1"),
                      qemu_owner=_dac_owner(root), disk_targets=targets)


def definition(virsh: Virsh, domain: str) -> str:
    """The persistent definition of ``domain`` with its secrets, as ``virsh define`` takes it back."""
    return virsh.run(["dumpxml", "--inactive", "--security-info", "--", domain],
                     f"give the definition of domain {domain}")


def running_definition(virsh: Virsh, domain: str) -> str:
    """The running domain's description as libvirt puts it into a save image: what a checkpoint resumes with.

    Unlike the definition it holds what runs now (devices attached live, the CPU model libvirt
    expanded); ``--migratable`` leaves out what only this run has (aliases, generated socket paths).
    """
    return virsh.run(["dumpxml", "--migratable", "--security-info", "--", domain],
                     f"describe the running domain {domain}")


def emulator(domain_xml: str) -> str | None:
    """The QEMU binary a description names (``<devices><emulator>``)."""
    try:
        found = ET.fromstring(domain_xml).findtext("devices/emulator")
    except ET.ParseError:
        return None
    return found.strip() if found else None


def exists(virsh: Virsh, name: str) -> bool:
    try:
        virsh.run(["domuuid", "--", name], f"look up domain {name}")
    except VirshFailed as exc:
        if exc.no_domain:
            return False
        raise
    return True


# -- internals -----------------------------------------------------------------------------------


def _parse(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise HozonError(f"{what} is not well-formed XML: {exc}") from None


def _dac_owner(root: ET.Element) -> tuple[int, int] | None:
    """(uid, gid) from ``<seclabel model='dac'><label>+64055:+64055</label>``, or None."""
    for label in root.iterfind("seclabel"):
        if label.get("model") != "dac" or label.get("type") == "none":
            continue
        text = (label.findtext("label") or "").strip()
        user, sep, group = text.partition(":")
        if not sep:
            continue
        try:
            uid = int(user.lstrip("+")) if user.lstrip("+").isdigit() else pwd.getpwnam(user).pw_uid
            gid = int(group.lstrip("+")) if group.lstrip("+").isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise HozonError(f"libvirt runs the domain's QEMU as {text!r}, which is no user and group here") from None
        return uid, gid
    return None
