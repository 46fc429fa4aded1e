"""CPU and I/O priority of Hozon's own process, so a backup on a busy host takes only what is left.

Set before any worker thread starts: Linux keeps both per thread, and new threads inherit them
(so do child processes such as ``qemu-nbd``). ``nice`` as nice(1) counts: 0 to 19, higher is kinder.
I/O priority as ionice(1) names it: ``idle``, or ``best-effort`` with a level 0 (first) to 7 (last).
"""

from __future__ import annotations

import ctypes
import os
import platform

from hozon.errors import UsageError

IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IO_CLASSES = {"best-effort": 2, "idle": 3}  # real-time (1) is left to root's own tools
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314, "ppc64le": 273, "s390x": 282}


def set_nice(value: int) -> None:
    if not 0 <= value <= 19:
        raise UsageError(f"--nice takes 0 to 19, not {value}")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except PermissionError:
        raise UsageError(f"the nice value cannot be lowered to {value} without privilege",
                         hint=f"it is {os.getpriority(os.PRIO_PROCESS, 0)} already") from None


def parse_ionice(spec: str) -> tuple[int, int]:
    """``idle``, ``best-effort`` or ``best-effort:LEVEL`` → (class, level)."""
    name, _, level = spec.partition(":")
    if name not in IO_CLASSES or (level and (not level.isdigit() or int(level) > 7)) or (name == "idle" and level):
        raise UsageError(f"{spec!r} is not an I/O priority", hint="give idle, best-effort or best-effort:0 … :7")
    return IO_CLASSES[name], int(level or 4)


def set_ionice(spec: str) -> None:
    io_class, level = parse_ionice(spec)
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        raise UsageError(f"setting the I/O priority is not supported on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, IOPRIO_WHO_PROCESS, 0, (io_class << IOPRIO_CLASS_SHIFT) | level) != 0:
        errno = ctypes.get_errno()
        raise UsageError(f"the I/O priority cannot be set to {spec}: {os.strerror(errno)}")
