"""Bringing a checkpoint back: its disks as thin images, its state as a file, and the QEMU that resumes it.

``hozon vm checkpoint restore SNAPSHOT --to DIR`` writes into DIR::

    vda.qcow2 …               each disk, thin, in the format it had (hozon.restore.image)
    vmstate                   the CPU, memory and device state: QEMU's migration stream
    checkpoint-<id>.json      the snapshot, as ``hozon snapshots --json`` lists it

and prints the command that resumes the VM: the saved command line (``--vm-config``) with the
disks pointed at the restored images and ``-incoming "exec:cat DIR/vmstate"``. With ``start`` it
runs that command itself (detached; QEMU's output goes to ``DIR/qemu.log``) and waits until QEMU
has loaded the state.

A checkpoint of a libvirt domain resumes through libvirt instead: its state is written as
``vmstate.save``, a libvirt save image whose domain XML has the disks pointed at the restored
images (``hozon.sources.libvirt.saveimage``), and the command is ``virsh restore``: the domain
itself (stopped or undefined), or with ``copy_name`` a copy beside it.

Before anything is written, :func:`compatibility` compares this host's QEMU with the one that took
the checkpoint: a missing binary or machine type, or an older QEMU, stops the restore; another
version of the same machine type is a note.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hozon.errors import CorruptData, HozonError, QmpError, UsageError
from hozon.repo.imagemap import decode_map, image_disks, map_ids
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot
from hozon.restore.image import DiskRestore, own_format, restore_image
from hozon.sources.libvirt.define import RestoredDisk, reachability_notes
from hozon.sources.libvirt.saveimage import (
    check_resumable,
    identity,
    restore,
    restore_args,
    resume_definition,
    save_header,
    state_of,
)
from hozon.sources.libvirt.virsh import Virsh
from hozon.sources.qemu.cmdline import point_disks_at, resume_argv
from hozon.sources.qemu.qmp import QmpClient

STATE_FILE = "vmstate"
SAVE_IMAGE = "vmstate.save"  # a libvirt checkpoint's state, with libvirt's header in front
QEMU_LOG = "qemu.log"
DEFAULT_QEMU = "qemu-system-x86_64"
LOAD_TIMEOUT = 300.0  # for QEMU to load the state
PREFETCH = 8


@dataclass
class Compatibility:
    problems: list[str] = field(default_factory=list)  # the checkpoint cannot resume here
    notes: list[str] = field(default_factory=list)  # it may, but something differs


@dataclass(frozen=True)
class CheckpointRestore:
    disks: list[DiskRestore]
    state_path: str
    command: list[str] | None  # resumes the VM; None without a saved command line
    notes: list[str]
    pid: int | None = None  # the QEMU started with ``start``
    status: str | None = None  # its run state once the state was loaded ("running", "paused")
    domain: str | None = None  # the libvirt domain resumed with ``start``


def checkpoint_of(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot's state entry; a snapshot that is no checkpoint is refused."""
    state = snapshot.extra.get("state")
    if snapshot.kind != "checkpoint" or not isinstance(state, dict):
        raise UsageError(f"snapshot {snapshot.short_id} is a {snapshot.kind} snapshot, not a checkpoint",
                         hint="hozon vm restore restores the disks of any image snapshot")
    return state


def qemu_binary(snapshot: Snapshot) -> str:
    return str(snapshot.extra.get("qemu_binary") or DEFAULT_QEMU)


def compatibility(snapshot: Snapshot) -> Compatibility:
    """What keeps the checkpoint from resuming on this host's QEMU, and what merely differs."""
    result = Compatibility()
    binary = qemu_binary(snapshot)
    if shutil.which(binary) is None:
        result.problems.append(f"{binary}, which ran the VM, is not installed here")
        return result
    here = _version(binary)
    taken = str(snapshot.extra.get("qemu_version") or "")
    if here and taken and here != taken:
        if _numbers(here) < _numbers(taken):
            result.problems.append(f"QEMU here is {here}, older than the {taken} that took the checkpoint; an older "
                                   "QEMU cannot load a newer one's state")
        else:
            result.notes.append(f"QEMU here is {here}, the checkpoint was taken on {taken}; the machine type keeps "
                                "the state compatible")
    machine = snapshot.extra.get("machine")
    if machine and machine not in _machines(binary):
        result.problems.append(f"machine type {machine} of the checkpoint is not offered by {binary} here")
    return result


def libvirt_description(snapshot: Snapshot) -> str | None:
    """The domain XML a libvirt checkpoint resumes with; None for a checkpoint taken through QMP."""
    if snapshot.extra.get("source") != "libvirt":
        return None
    xml = snapshot.extra.get("running_xml") or snapshot.extra.get("domain_xml")  # older ones: the definition
    return str(xml) if xml else None


def libvirt_of(snapshot: Snapshot, uri: str | None) -> Virsh:
    """The libvirt to resume a libvirt checkpoint in: ``uri``, or the one it was taken from."""
    recorded = snapshot.extra.get("libvirt")
    return Virsh(uri or (recorded.get("uri") if isinstance(recorded, dict) else None))


@dataclass(frozen=True)
class _LibvirtResume:
    """Where and as what a libvirt checkpoint resumes: the domain itself, or the copy ``copy_name``."""

    virsh: Virsh
    domain_xml: str
    domain: str  # the name it resumes as
    copy_name: str | None
    persistent: bool  # a stopped, defined domain takes the state; otherwise it resumes as a transient one

    @classmethod
    def check(cls, snapshot: Snapshot, domain_xml: str, copy_name: str | None, uri: str | None,
              start: bool) -> _LibvirtResume:
        """Fail now, before anything is written, if libvirt would refuse to resume it."""
        virsh = libvirt_of(snapshot, uri)
        name, uuid = identity(domain_xml)
        domain = copy_name or name
        persistent = False
        if start or copy_name:
            persistent = check_resumable(virsh, domain, "" if copy_name else uuid)
        return cls(virsh, domain_xml, domain, copy_name, persistent)

    def resume(self, repo: Repository, snapshot: Snapshot, state: dict[str, Any], disks: list[DiskRestore],
               save_image: Path, start: bool, paused: bool, notes: list[str]) -> CheckpointRestore:
        """Write the save image for the restored disks; with ``start``, resume it."""
        restored = [RestoredDisk(d.name, str(Path(d.path).absolute()), d.format) for d in disks]
        xml, changes = resume_definition(self.domain_xml, restored, self.copy_name, str(save_image.parent))
        notes = notes + changes + reachability_notes(restored)
        write_state(repo, snapshot, state, save_image, save_header(xml, bool(state.get("was_running", True))))
        path = str(save_image.absolute())
        command = self.virsh.command(*restore_args(path, paused if start else None))
        if not start:
            return CheckpointRestore(disks, str(save_image), command, notes)
        restore(self.virsh, path, paused, f"resume checkpoint {snapshot.short_id} as domain {self.domain}")
        if self.persistent:
            notes.append(f"{self.domain} runs on the restored images, but its definition still names its old disks "
                         "for its next start; virsh edit it to keep the restored ones")
        else:
            notes.append(f"{self.domain} is a transient domain, which libvirt forgets when it stops; keep it with: "
                         f"virsh dumpxml {self.domain} > {self.domain}.xml && virsh define {self.domain}.xml")
        return CheckpointRestore(disks, str(save_image), command, notes, status=state_of(self.virsh, self.domain),
                                 domain=self.domain)


def restore_checkpoint(repo: Repository, snapshot: Snapshot, to: str, start: bool = False, paused: bool = False,
                       progress: Callable[[int, int], None] | None = None, copy_name: str | None = None,
                       uri: str | None = None) -> CheckpointRestore:
    """Restore the disks and state of ``snapshot`` into the directory ``to``; with ``start``, resume the VM.

    ``copy_name`` and ``uri`` are for libvirt checkpoints: resume a copy of that name, in that libvirt.
    """
    state = checkpoint_of(snapshot)
    domain_xml = libvirt_description(snapshot)
    if (copy_name or uri) and domain_xml is None:
        raise UsageError(f"checkpoint {snapshot.short_id} was taken through QMP, not libvirt; --as and --connect "
                         "are for libvirt checkpoints")
    fit = compatibility(snapshot)
    if fit.problems:
        raise HozonError(f"checkpoint {snapshot.short_id} cannot resume on this host: {fit.problems[0]}",
                         hint="; ".join(fit.problems[1:]) or None)
    config = snapshot.extra.get("vm_config")
    if start and not config and domain_xml is None:
        raise UsageError(f"checkpoint {snapshot.short_id} kept no QEMU command line, so Hozon cannot start it",
                         hint="take checkpoints with --vm-config FILE; restore without --start meanwhile")
    libvirt = _LibvirtResume.check(snapshot, domain_xml, copy_name, uri, start) if domain_xml else None
    target = Path(to)
    target.mkdir(parents=True, exist_ok=True)
    state_path = target / (SAVE_IMAGE if libvirt else STATE_FILE)
    metadata = target / f"checkpoint-{snapshot.short_id}.json"
    for path in (state_path, metadata):
        if path.exists():
            raise HozonError(f"{path} exists; remove it or choose another --to")
    images: dict[str, str] = {}
    disks: list[DiskRestore] = []
    for disk in image_disks(snapshot.extra):
        fmt = own_format(disk)
        path = target / f"{disk['name']}.{fmt}"
        disks += restore_image(repo, snapshot, str(path), str(disk["name"]), fmt, progress)
        if disk.get("filename"):
            images[str(disk["filename"])] = str(path.absolute())
    metadata.write_text(json.dumps(snapshot.listing(), indent=2, sort_keys=True) + "\n")
    if libvirt:
        return libvirt.resume(repo, snapshot, state, disks, state_path, start, paused, fit.notes)
    write_state(repo, snapshot, state, state_path)
    command = None
    if config:
        incoming = "exec:cat " + shlex.quote(str(state_path.absolute()))
        command = resume_argv(point_disks_at(shlex.split(str(config)), images), incoming, paused)
    if not start or command is None:
        return CheckpointRestore(disks, str(state_path), command, fit.notes)
    pid, status = _start(command, target / QEMU_LOG, paused)
    return CheckpointRestore(disks, str(state_path), command, fit.notes, pid, status)


def state_chunks(repo: Repository, snapshot: Snapshot, state: dict[str, Any]) -> Iterator[bytes]:
    """The state stream of a checkpoint, chunk by chunk, each verified, fetched a few ahead."""
    where = f"the state of checkpoint {snapshot.short_id}"
    try:
        lengths = np.frombuffer(base64.b64decode(str(state.get("lengths", ""))), "<u4")
        ids = [row.tobytes() for map_id in map_ids(state)
               for row in decode_map(repo.load_blob(map_id), f"map blob {map_id.hex()[:16]}")]
    except (ValueError, TypeError) as exc:
        raise CorruptData(f"snapshots/{snapshot.id}", f"{where} is malformed ({exc})") from None
    if len(ids) != len(lengths) or int(lengths.sum()) != state.get("size"):
        raise CorruptData(f"snapshots/{snapshot.id}", f"{where} lists chunks that do not add up to its size")
    with ThreadPoolExecutor(2, thread_name_prefix="hozon-state") as pool:
        ahead: deque[tuple[int, Future[bytes]]] = deque()
        for index, blob_id in enumerate(ids):
            ahead.append((index, pool.submit(repo.load_blob, blob_id)))
            if len(ahead) > PREFETCH:
                yield _checked(*ahead.popleft(), lengths, where)
        while ahead:
            yield _checked(*ahead.popleft(), lengths, where)


def _checked(index: int, future: Future[bytes], lengths: np.ndarray[Any, Any], where: str) -> bytes:
    data = future.result()
    if len(data) != int(lengths[index]):
        raise CorruptData(where, f"chunk {index} has {len(data)} bytes, not {int(lengths[index])}")
    return data


def write_state(repo: Repository, snapshot: Snapshot, state: dict[str, Any], path: Path, header: bytes = b"") -> None:
    """The state stream, after ``header``, into a new file ``path`` (as ``path.partial`` until complete)."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("xb") as out:
            out.write(header)
            for chunk in state_chunks(repo, snapshot, state):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        partial.rename(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise HozonError(f"cannot write the VM state to {path}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _start(command: list[str], log: Path, paused: bool) -> tuple[int, str]:
    """Start the resuming QEMU detached, with a monitor of Hozon's own; wait until it loaded the state."""
    sockdir = Path(tempfile.mkdtemp(prefix="hozon-resume-"))
    monitor = sockdir / "qmp.sock"
    argv = [*command, "-qmp", f"unix:{monitor},server=on,wait=off"]
    with log.open("ab") as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        except OSError as exc:
            raise HozonError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    try:
        status = wait_loaded(proc, monitor, log)
        if status == "paused" and not paused:
            # The state says "paused": Hozon stopped the guest for the instant before QEMU saved it.
            with QmpClient.connect(monitor) as qmp:
                qmp.execute("cont")
                status = str(qmp.execute("query-status").get("status"))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc.pid, status


def wait_loaded(proc: subprocess.Popen[bytes], monitor: Path, log: Path, timeout: float = LOAD_TIMEOUT) -> str:
    """Wait until the QEMU ``proc`` has loaded its incoming state; its run state then."""
    deadline = time.monotonic() + timeout
    while not monitor.exists():
        _alive(proc, log)
        if time.monotonic() > deadline:
            raise HozonError(f"QEMU opened no monitor within {timeout:g} s")
        time.sleep(0.02)
    with QmpClient.connect(monitor) as qmp:
        while True:
            _alive(proc, log)
            status = qmp.execute("query-status")
            run_state = str(status.get("status")) if isinstance(status, dict) else ""
            if run_state not in ("inmigrate", "prelaunch", ""):
                return run_state
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU did not load the VM's state within {timeout:g} s")
            time.sleep(0.05)


def _alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        raise HozonError(f"QEMU exited with code {proc.returncode} while loading the VM's state: "
                         f"{lines[-1] if lines else 'no output'}", hint=f"its output is in {log}")


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    found = re.search(r"version (\d+\.\d+\.\d+)", out)
    return found.group(1) if found else ""


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def _machines(binary: str) -> set[str]:
    out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        words = line.split()
        if words:
            names.add(words[0])
            alias = re.search(r"\(alias of ([^)]+)\)", line)
            if alias:
                names.add(alias.group(1))
    return names
