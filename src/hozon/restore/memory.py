"""A checkpoint's guest physical memory as an ELF core file, for memory-forensics tools.

The state stream is QEMU's own format, which no forensics tool reads; QEMU itself turns it into
an ELF core (``dump-guest-memory``, the format volatility, crash and gdb read). So Hozon starts
a throwaway copy of the VM, paused from the start (``-S``), that loads the state from a pipe
Hozon feeds from the repository (``-incoming fd:N``: no file of the memory's size), and asks it
for the dump. The copy never runs guest code and touches nothing of the original: its disks are
blank images of the right sizes, and monitors, serial ports, sockets and networks of the saved
command line are replaced (``hozon.sources.qemu.cmdline.isolated_argv``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

from hozon.errors import HozonError, UsageError
from hozon.repo.imagemap import image_disks
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.restore.checkpoint import checkpoint_of, compatibility, state_chunks, wait_loaded
from hozon.sources.qemu.cmdline import isolated_argv, point_disks_at
from hozon.sources.qemu.qmp import QmpClient

DUMP_TIMEOUT = 600.0


def export_memory(repo: Repository, snapshot: Snapshot, to: str) -> int:
    """Write the guest memory of checkpoint ``snapshot`` to the new file ``to`` as an ELF core; its size."""
    state = checkpoint_of(snapshot)
    config = snapshot.extra.get("vm_config")
    if not config:
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
        blanks = {str(d["filename"]): _blank(Path(work), d) for d in image_disks(snapshot.extra) if d.get("filename")}
        read_end, write_end = os.pipe()
        monitor = Path(work) / "qmp.sock"
        argv = [*isolated_argv(point_disks_at(shlex.split(str(config)), blanks)), "-S",
                "-incoming", f"fd:{read_end}", "-qmp", f"unix:{monitor},server=on,wait=off"]
        log = Path(work) / "qemu.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(read_end,))
        os.close(read_end)
        feeder = _Feeder(repo, snapshot, state, write_end)
        feeder.start()
        try:
            wait_loaded(proc, monitor, log)
            feeder.join()
            with QmpClient.connect(monitor) as qmp:
                qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{partial.absolute()}"},
                            timeout=DUMP_TIMEOUT)
                with contextlib.suppress(HozonError):
                    qmp.execute("quit")
            proc.wait(30)
            partial.rename(target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            feeder.stop()
        if feeder.error is not None:
            raise feeder.error
    return target.stat().st_size


class _Feeder(threading.Thread):
    """Writes the state stream into the pipe QEMU loads it from; stops when QEMU stops reading."""

    def __init__(self, repo: Repository, snapshot: Snapshot, state: dict[str, object], fd: int) -> None:
        super().__init__(name="hozon-state-feeder", daemon=True)
        self.repo, self.snapshot, self.state, self.fd = repo, snapshot, state, fd
        self.error: HozonError | None = None
        self._closed = False

    def run(self) -> None:
        try:
            for chunk in state_chunks(self.repo, self.snapshot, dict(self.state)):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view):]
        except OSError:
            pass  # QEMU stopped reading (or was stopped): wait_loaded says why
        except HozonError as exc:
            self.error = exc
        finally:
            self.stop()

    def stop(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def _blank(work: Path, disk: dict[str, object]) -> str:
    """An empty image of the disk's size and format: the paused copy never reads it."""
    fmt = "raw" if disk.get("format") == "raw" else "qcow2"
    path = work / f"{disk['name']}.{fmt}"
    done = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(disk["size"])],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise HozonError(f"qemu-img could not create a blank image for disk {disk['name']}: {done.stderr.strip()}")
    return str(path)
