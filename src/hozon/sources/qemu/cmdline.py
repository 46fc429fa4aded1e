"""A VM's saved QEMU command line, rewritten to bring a checkpoint back.

A checkpoint resumes only in a QEMU with the same machine and devices, so Hozon starts the very
command line the user kept with the checkpoint (``--vm-config FILE``, one shell-quoted line) and
changes as little as it must:

- :func:`point_disks_at` makes each disk's option (``-drive file=…``, ``-blockdev …filename=…``)
  name the restored image instead of the original one;
- :func:`resume_argv` feeds the saved state in (``-incoming``) and, for ``--paused``, adds ``-S``;
- :func:`isolated_argv` is for a throwaway copy that must not touch what the original VM uses
  (memory export): no monitors, files or sockets of the original (serial ports and character
  devices stay, connected to nothing), no display, every network backend replaced by a user-mode
  one that reaches nothing (``restrict=on``, no forwarded ports).

QEMU option values are ``key=value`` lists separated by commas, a literal comma written twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from hozon.errors import HozonError

FILE_KEYS: Final = ("file", "filename", "file.filename")
_DROPPED: Final = {"-qmp": 1, "-monitor": 1, "-mon": 1, "-pidfile": 1, "-daemonize": 0, "-D": 1, "-vnc": 1,
                   "-spice": 1, "-display": 1, "-incoming": 1, "-S": 0, "-nographic": 0}


def split_options(value: str) -> list[str]:
    """``a=1,b=x,,y`` → ``["a=1", "b=x,y"]``."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def join_options(parts: Sequence[str]) -> str:
    return ",".join(part.replace(",", ",,") for part in parts)


def point_disks_at(argv: Sequence[str], images: Mapping[str, str]) -> list[str]:
    """``argv`` with every option naming an original image (key of ``images``) naming its new path instead.

    Raises when an original image is named nowhere: the VM would come back with another disk.
    """
    out = list(argv)
    found: set[str] = set()
    for i, arg in enumerate(out[:-1]):
        if arg not in ("-drive", "-blockdev", "-hda", "-hdb", "-hdc", "-hdd"):
            continue
        value = out[i + 1]
        if arg.startswith("-hd"):
            if value in images:
                out[i + 1] = images[value]
                found.add(value)
            continue
        parts = split_options(value)
        for j, part in enumerate(parts):
            key, _, path = part.partition("=")
            if key in FILE_KEYS and path in images:
                parts[j] = f"{key}={images[path]}"
                found.add(path)
        out[i + 1] = join_options(parts)
    if missing := sorted(set(images) - found):
        raise HozonError(f"the saved command line names no disk image {missing[0]}, so Hozon cannot point the "
                         "VM at the restored copy", hint="restore the disks and state without --start and edit the "
                                                         "command line by hand")
    return out


def resume_argv(argv: Sequence[str], incoming: str, paused: bool) -> list[str]:
    """``argv`` taking its state from ``incoming`` (a ``-incoming`` URI); ``-S`` when ``paused``."""
    out = _without(argv, {"-incoming": 1, "-S": 0})
    return [*out, "-incoming", incoming, *(["-S"] if paused else [])]


def isolated_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with nothing the original VM holds: monitors, serial ports, files, sockets, displays, networks."""
    out = _without(argv, _DROPPED)
    result: list[str] = []
    i = 0
    while i < len(out):
        arg = out[i]
        if arg in ("-serial", "-parallel") and i + 1 < len(out):
            result += [arg, "null"]  # the port stays (the state has it), connected to nothing
            i += 2
            continue
        if arg in ("-chardev", "-netdev") and i + 1 < len(out):
            ident = next((p[3:] for p in split_options(out[i + 1]) if p.startswith("id=")), None)
            if ident is None:
                raise HozonError(f"the saved command line has a {arg} without an id: {out[i + 1]}")
            result += [arg, f"null,id={ident}" if arg == "-chardev" else f"user,id={ident},restrict=on"]
            i += 2
            continue
        result.append(arg)
        i += 1
    return [*result, "-display", "none"]


def _without(argv: Sequence[str], options: Mapping[str, int]) -> list[str]:
    """``argv`` less the ``options`` (each with its count of values)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if i > 0 and arg in options:
            i += 1 + options[arg]
            continue
        out.append(arg)
        i += 1
    return out
