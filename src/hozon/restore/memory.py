"""A checkpoint's guest physical memory as an ELF core file, for memory-forensics tools.

The state stream is QEMU's own format, which no forensics tool reads; QEMU itself turns it into
an ELF core (``dump-guest-memory``, the format volatility, crash and gdb read). So Hozon starts
a throwaway copy of the VM, paused from the start, that loads the state from a pipe Hozon feeds
from the repository (no file of the memory's size), and asks it for the dump. The copy never runs
guest code and touches nothing of the original: its disks are blank images of the right sizes,
and its monitors, serial ports, sockets and networks are replaced.

- A checkpoint taken through QMP: Hozon runs QEMU from the saved command line
  (``hozon.sources.qemu.cmdline.isolated_argv``, ``-S -incoming fd:N``).
- A checkpoint of a libvirt domain: libvirt runs it, as a transient domain
  ``hozon-memory-<id>-<pid>-<random>`` (``virsh restore --paused`` of a save image that Hozon writes
  into a FIFO, ``hozon.sources.libvirt.saveimage.inspection_definition``), and writes the dump
  (``virsh dump --memory-only --format elf``); the domain is destroyed afterwards. A Hozon killed
  while libvirt dumps leaves it behind, paused; the next export on this host destroys the copies
  whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hozon.errors import HozonError, UsageError
from hozon.repo.imagemap import image_disks
from hozon.repo.locks import process_alive
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.restore.checkpoint import (
    checkpoint_of,
    compatibility,
    libvirt_description,
    libvirt_of,
    state_chunks,
    wait_loaded,
)
from hozon.restore.image import own_format
from hozon.sources.libvirt.define import RestoredDisk
from hozon.sources.libvirt.saveimage import inspection_definition, restore, save_header
from hozon.sources.libvirt.virsh import Virsh, VirshFailed
from hozon.sources.qemu.cmdline import isolated_argv, point_disks_at
from hozon.sources.qemu.qmp import QmpClient

DUMP_TIMEOUT = 600.0
COPY_NAME = re.compile(r"hozon-memory-[0-9a-f]+-(\d+)-[0-9a-f]{6}")  # hozon-memory-<snapshot>-<pid>-<random>


def export_memory(repo: Repository, snapshot: Snapshot, to: str, uri: str | None = None) -> int:
    """Write the guest memory of checkpoint ``snapshot`` to the new file ``to`` as an ELF core; its size.

    ``uri`` is the libvirt that runs the copy of a libvirt checkpoint (default: the one it was taken from).
    """
    state = checkpoint_of(snapshot)
    domain_xml = libvirt_description(snapshot)
    config = snapshot.extra.get("vm_config")
    if uri and domain_xml is None:
        raise UsageError(f"checkpoint {snapshot.short_id} was taken through QMP, not libvirt; --connect is for "
                         "libvirt checkpoints")
    if not config and domain_xml is None:
        raise UsageError(f"checkpoint {snapshot.short_id} kept no QEMU command line, which QEMU needs to load its "
                         "state", hint="take checkpoints with --vm-config FILE")
    fit = compatibility(snapshot)
    if fit.problems:
        raise HozonError(f"this host's QEMU cannot load checkpoint {snapshot.short_id}: {fit.problems[0]}")
    target = Path(to)
    if target.exists():
        raise HozonError(f"{target} exists; remove it or choose another --to")
    partial = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="hozon-memory-") as work:
        try:
            if domain_xml is not None:
                _dump_through_libvirt(repo, snapshot, state, domain_xml, libvirt_of(snapshot, uri), Path(work),
                                      partial)
            else:
                _dump_through_qemu(repo, snapshot, state, str(config), Path(work), partial)
            partial.rename(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return target.stat().st_size


def _dump_through_qemu(repo: Repository, snapshot: Snapshot, state: dict[str, object], config: str, work: Path,
                       dump: Path) -> None:
    blanks = {str(d["filename"]): _blank(work, d).path for d in image_disks(snapshot.extra) if d.get("filename")}
    read_end, write_end = os.pipe()
    monitor = work / "qmp.sock"
    argv = [*isolated_argv(point_disks_at(shlex.split(config), blanks)), "-S",
            "-incoming", f"fd:{read_end}", "-qmp", f"unix:{monitor},server=on,wait=off"]
    log = work / "qemu.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(read_end,))
    os.close(read_end)
    feeder = _Feeder(repo, snapshot, state, lambda: write_end)
    feeder.start()
    try:
        wait_loaded(proc, monitor, log)
        feeder.join()
        with QmpClient.connect(monitor) as qmp:
            qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump.absolute()}"},
                        timeout=DUMP_TIMEOUT)
            with contextlib.suppress(HozonError):
                qmp.execute("quit")
        proc.wait(30)
    except HozonError:
        feeder.raise_error()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        feeder.stop()
    feeder.raise_error()


def _dump_through_libvirt(repo: Repository, snapshot: Snapshot, state: dict[str, object], domain_xml: str,
                          virsh: Virsh, work: Path, dump: Path) -> None:
    work.chmod(0o755)  # QEMU runs as libvirt's user: it opens the blank disks
    _remove_abandoned_copies(virsh)
    name = f"hozon-memory-{snapshot.short_id}-{os.getpid()}-{os.urandom(3).hex()}"
    blanks = [_blank(work, d) for d in image_disks(snapshot.extra)]
    header = save_header(inspection_definition(domain_xml, name, blanks), was_running=False)
    fifo = work / "vmstate.save"
    os.mkfifo(fifo, 0o600)
    feeder = _Feeder(repo, snapshot, state, lambda: os.open(fifo, os.O_WRONLY), header)
    feeder.start()
    try:
        restore(virsh, str(fifo), True, f"load checkpoint {snapshot.short_id} into a paused copy")
        feeder.join()
        virsh.run(["dump", "--memory-only", "--format", "elf", "--", name, str(dump.absolute())],
                  f"dump the memory of {name}", timeout=DUMP_TIMEOUT)
    except HozonError:
        feeder.raise_error()
        raise
    finally:
        with contextlib.suppress(VirshFailed):
            virsh.run(["destroy", "--", name], f"remove the copy {name}")
        feeder.stop(unblock=fifo)
    feeder.raise_error()


def _remove_abandoned_copies(virsh: Virsh) -> None:
    """Destroy the paused copies that a killed ``hozon vm memory`` on this host left in libvirt."""
    if virsh.uri is not None and not virsh.uri.startswith("qemu:///"):
        return  # a remote libvirt: the process ids in the names are another host's
    for name in virsh.run(["list", "--name"], "list the running domains").split():
        found = COPY_NAME.fullmatch(name)
        if found and not process_alive(int(found.group(1))):
            with contextlib.suppress(VirshFailed):
                virsh.run(["destroy", "--", name], f"remove the abandoned copy {name}")


class _Feeder(threading.Thread):
    """Writes ``prefix`` and the state stream to what ``open_fd`` opens; stops when the reader stops reading."""

    def __init__(self, repo: Repository, snapshot: Snapshot, state: dict[str, object], open_fd: Callable[[], int],
                 prefix: bytes = b"") -> None:
        super().__init__(name="hozon-state-feeder", daemon=True)
        self.repo, self.snapshot, self.state, self.open_fd, self.prefix = repo, snapshot, state, open_fd, prefix
        self.error: HozonError | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            fd = self.open_fd()  # a FIFO's open waits for its reader
            with self._lock:
                if self._fd == -1:  # stopped meanwhile
                    os.close(fd)
                    return
                self._fd = fd
            for chunk in (self.prefix, *state_chunks(self.repo, self.snapshot, dict(self.state))):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        except OSError:
            pass  # the reader stopped reading (or was stopped): the caller says why
        except HozonError as exc:
            self.error = exc
        finally:
            self.stop()

    def stop(self, unblock: Path | None = None) -> None:
        """Close the write end; ``unblock``: the FIFO whose open may still wait for a reader that never came."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd is not None and fd >= 0:
            os.close(fd)
        if unblock is not None and self.is_alive():
            with contextlib.suppress(OSError):
                os.close(os.open(unblock, os.O_RDONLY | os.O_NONBLOCK))
            self.join(10)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _blank(work: Path, disk: dict[str, Any]) -> RestoredDisk:
    """An empty image of the disk's size and format: the paused copy never reads it."""
    fmt = own_format(disk)
    path = work / f"{disk['name']}.{fmt}"
    done = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(disk["size"])],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise HozonError(f"qemu-img could not create a blank image for disk {disk['name']}: {done.stderr.strip()}")
    return RestoredDisk(str(disk["name"]), str(path), fmt)
