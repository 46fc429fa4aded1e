"""How a libvirt checkpoint's domain XML is changed for a resumed copy and for a memory export.

(That libvirt accepts what Hozon writes, and resumes the guest from it, is tested against a real
libvirtd in tests/e2e/test_vm_checkpoint_libvirt.py.)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hozon.sources.libvirt.define import RestoredDisk
from hozon.sources.libvirt.saveimage import HEADER, inspection_definition, resume_definition, save_header

RUNNING = """<domain type='kvm'>
  <name>web1</name>
  <uuid>0b6d2a4e-8f0c-4a53-9d35-1d4bd6a7a0c1</uuid>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
      <model type='virtio'/><driver name='vhost' queues='2'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>
    <serial type='file'><source path='/var/log/web1-serial.log'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/web1-serial.log'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/run/web1/agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0'/>
    <video><model type='virtio'/></video>
  </devices>
</domain>
"""
RESTORED = [RestoredDisk("vda", "/restore/vda.qcow2", "qcow2")]


def devices(xml: str) -> ET.Element:
    found = ET.fromstring(xml).find("devices")
    assert found is not None
    return found


def test_the_save_image_header_is_libvirts() -> None:
    written = save_header("<domain/>", was_running=True)
    magic, version, data_len, was_running, fmt, cookie = HEADER.unpack_from(written)
    assert HEADER.size == 92 and (magic, version, was_running, fmt, cookie) == (b"LibvirtQemudSave", 2, 1, 0, 0)
    assert len(written) == HEADER.size + data_len and written[HEADER.size:].startswith(b"<domain/>\0")
    assert HEADER.unpack_from(save_header("<domain/>", was_running=False))[3] == 0


def test_resuming_the_domain_itself_changes_only_its_disks() -> None:
    xml, notes = resume_definition(RUNNING, RESTORED)
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web1" and root.findtext("uuid") == "0b6d2a4e-8f0c-4a53-9d35-1d4bd6a7a0c1"
    sources = [d.find("source").get("file") for d in root.iterfind("devices/disk")]  # type: ignore[union-attr]
    assert sources == ["/restore/vda.qcow2", "/srv/iso/debian.iso"]
    assert root.find("devices/interface/link") is None and root.findtext("os/nvram")
    assert devices(xml).find("serial/source").get("path") == "/var/log/web1-serial.log"  # type: ignore[union-attr]
    assert notes == []


def test_a_copy_beside_the_original_takes_nothing_of_it_but_its_devices() -> None:
    xml, notes = resume_definition(RUNNING, RESTORED, "web1-incident", "/restore")
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web1-incident" and root.find("uuid") is None and root.find("os/nvram") is None
    found = devices(xml)
    serial, console = found.find("serial/source"), found.find("console/source")
    assert serial is not None and console is not None and serial.get("path") == console.get("path")
    assert serial.get("path") == "/restore/web1-incident-serial0.log"
    assert found.find("channel/source").get("path") == "/restore/web1-incident-channel1.sock"  # type: ignore[union-attr]
    graphics = found.find("graphics")
    assert graphics is not None and graphics.get("autoport") == "yes" and "port" not in graphics.attrib
    interface = found.find("interface")
    assert interface is not None and interface.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert interface.find("mac").get("address") == "52:54:00:aa:bb:cc"  # type: ignore[union-attr]
    assert any("links are down" in n for n in notes) and any("UEFI" in n for n in notes)


def test_the_copy_for_a_memory_export_reaches_nothing_outside() -> None:
    blank = [RestoredDisk("vda", "/tmp/hozon-memory-x/vda.qcow2", "qcow2")]
    root = ET.fromstring(inspection_definition(RUNNING, "hozon-memory-1a2b3c4d-ff00aa", blank))
    assert root.findtext("name") == "hozon-memory-1a2b3c4d-ff00aa" and root.find("uuid") is None
    assert root.find("devices/disk/source").get("file") == "/tmp/hozon-memory-x/vda.qcow2"  # type: ignore[union-attr]
    interface = root.find("devices/interface")
    assert interface is not None and interface.get("type") == "user" and interface.find("source") is None
    assert interface.find("driver").attrib == {"queues": "2"}  # type: ignore[union-attr]  # a device property
    assert interface.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert interface.find("address") is not None and interface.find("model") is not None  # the same device
    for tag in ("serial", "console", "channel"):
        chardev = root.find(f"devices/{tag}")
        assert chardev is not None and chardev.get("type") == "null" and chardev.find("source") is None
        assert chardev.find("target") is not None
    assert root.find("devices/graphics") is None and root.find("devices/video") is not None
