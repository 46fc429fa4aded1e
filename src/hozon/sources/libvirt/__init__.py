"""libvirt as a source: the running domains it manages, backed up through QEMU's monitor.

``virsh.py`` runs libvirt's client; ``domain.py`` reads a domain's live description and its
definition; ``monitor.py`` passes QMP through libvirt (:class:`LibvirtMonitor`, a ``QmpClient``
for everything in ``hozon.sources.qemu``); ``agent.py`` passes guest agent commands through
libvirt (:class:`LibvirtGuestAgent`, a ``GuestFreezer`` for ``--freeze``); ``source.py`` is what
``hozon vm backup --libvirt`` hands to the image backup; ``define.py`` defines a restored copy
(``hozon vm restore --libvirt-define``); ``saveimage.py`` resumes a checkpoint through libvirt
(a save image for ``virsh restore``). Why Hozon passes QMP through rather than using
libvirt's backup API is in docs/vm-backup.md.
"""

from hozon.sources.libvirt.agent import LibvirtGuestAgent, guest_quiesce
from hozon.sources.libvirt.define import (
    Defined,
    RestoredDisk,
    check_name_free,
    copy_definition,
    define_copy,
    saved_definition,
)
from hozon.sources.libvirt.domain import DomainInfo, definition, describe
from hozon.sources.libvirt.monitor import LibvirtMonitor
from hozon.sources.libvirt.source import LibvirtSource
from hozon.sources.libvirt.virsh import Virsh, VirshFailed

__all__ = [
    "Defined",
    "DomainInfo",
    "LibvirtGuestAgent",
    "LibvirtMonitor",
    "LibvirtSource",
    "RestoredDisk",
    "Virsh",
    "VirshFailed",
    "check_name_free",
    "copy_definition",
    "define_copy",
    "definition",
    "describe",
    "guest_quiesce",
    "saved_definition",
]
