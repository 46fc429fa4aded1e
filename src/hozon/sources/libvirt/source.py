"""A libvirt domain as the source of an image backup (``hozon vm backup --libvirt DOMAIN``).

:class:`LibvirtSource` is what ``hozon.backup.image.backup_vm`` takes instead of a QMP socket
(its ``MonitorSource``): the monitor through libvirt, the disks named by their libvirt targets
(``vda``, not QEMU's ``virtio-disk0``), a scratch directory QEMU's user can write, the
domain's definition for the snapshot (``extra["domain_xml"]``) so the VM can be defined again,
for a checkpoint also the running domain's migratable description (``extra["running_xml"]``),
which resumes it (``hozon.sources.libvirt.saveimage``), and the freeze of the guest's file
systems through libvirt's channel to its agent (``--freeze``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hozon.errors import QmpError
from hozon.sources.libvirt.agent import guest_quiesce
from hozon.sources.libvirt.domain import definition, emulator, running_definition
from hozon.sources.libvirt.monitor import LibvirtMonitor
from hozon.sources.qemu.disks import Disk, list_disks
from hozon.sources.qemu.guest_agent import GuestQuiesce
from hozon.sources.qemu.qmp import QmpClient


class LibvirtSource:
    """The running libvirt domain ``domain`` (name, id or UUID) on libvirt ``uri`` (None: virsh's default)."""

    kind: str = "libvirt"

    def __init__(self, domain: str, uri: str | None = None) -> None:
        self.domain = domain
        self.uri = uri or None
        self._monitor: LibvirtMonitor | None = None
        self._definition = ""
        self._running = ""

    def connect(self) -> QmpClient:
        monitor = LibvirtMonitor.connect(self.domain, uri=self.uri)
        try:
            self._definition = definition(monitor.virsh, monitor.domain.uuid)
            self._running = running_definition(monitor.virsh, monitor.domain.uuid)  # before the instant
        except BaseException:
            monitor.close()
            raise
        self._monitor = monitor
        return monitor

    def disks(self, qmp: QmpClient) -> list[Disk]:
        """The domain's disks, each named by its target (``vda``) where libvirt gives one."""
        targets = self._session().domain.disk_targets
        disks = sorted((dataclasses.replace(d, name=targets.get(d.name, d.name)) for d in list_disks(qmp)),
                       key=lambda d: d.name)
        names = [d.name for d in disks]
        if len(set(names)) != len(names):
            raise QmpError(f"two disks of libvirt domain {self._session().domain.name} would have the same name: "
                           f"{', '.join(names)}")
        return disks

    def monitor_args(self) -> list[str]:
        """How a guardian (``hozon.sources.qemu.guardian``) reaches this domain's monitor."""
        return ["--libvirt", self._session().domain.uuid, *(["--connect", self.uri] if self.uri else [])]

    def share_scratch(self, workdir: Path) -> None:
        self._session().share_directory(workdir)

    def guest_quiesce(self, freeze_timeout: float) -> GuestQuiesce:
        """The guest's file systems frozen around the instant, through the agent channel libvirt keeps."""
        domain = self._session().domain
        return guest_quiesce(domain.uuid, self.uri, domain.name, freeze_timeout)

    def snapshot_extra(self, checkpoint: bool) -> dict[str, Any]:
        domain = self._session().domain
        extra: dict[str, Any] = {"domain_xml": self._definition,
                                 "libvirt": {"domain": domain.name, "uuid": domain.uuid, "uri": self.uri}}
        if checkpoint:
            extra.update(running_xml=self._running, qemu_binary=emulator(self._running))
        return extra

    def _session(self) -> LibvirtMonitor:
        if self._monitor is None:
            raise RuntimeError("LibvirtSource.connect() was not called")
        return self._monitor
