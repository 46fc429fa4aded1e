"""QEMU as a source: the QMP session (qmp.py) through which Hozon asks a running VM for its disks and
their dirty bitmaps (disks.py), point-in-time (fleecing) views of those disks over NBD (fleece.py)
and its CPU/memory/device state.

Every failure is a ``QmpError`` (a ``HozonError``, exit code 1); an error QEMU reports for one
command is its subclass ``QmpCommandError``, which keeps QEMU's error class and description.
"""

from hozon.errors import QmpCommandError, QmpError
from hozon.sources.qemu.disks import Bitmap, Disk, bitmaps, list_disks
from hozon.sources.qemu.fleece import DiskExport, PointInTime, cleanup_leftovers
from hozon.sources.qemu.qmp import QemuVersion, QmpClient, QmpEvent

__all__ = [
    "Bitmap",
    "Disk",
    "DiskExport",
    "PointInTime",
    "QemuVersion",
    "QmpClient",
    "QmpCommandError",
    "QmpError",
    "QmpEvent",
    "bitmaps",
    "cleanup_leftovers",
    "list_disks",
]
