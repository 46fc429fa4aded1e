"""QEMU as a source: the QMP session (qmp.py) through which Hozon asks a running VM for dirty
bitmaps, point-in-time (fleecing) views of its disks and its CPU/memory/device state.

Every failure is a ``QmpError`` (a ``HozonError``, exit code 1); an error QEMU reports for one
command is its subclass ``QmpCommandError``, which keeps QEMU's error class and description.
"""

from hozon.errors import QmpCommandError, QmpError
from hozon.sources.qemu.qmp import QemuVersion, QmpClient, QmpEvent

__all__ = ["QemuVersion", "QmpClient", "QmpCommandError", "QmpError", "QmpEvent"]
