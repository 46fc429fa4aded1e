"""Image-level backup of a running QEMU VM: every disk at one instant, changed blocks only.

The VM is asked (QMP) for a point-in-time view of all its disks in one transaction; Hozon reads
that frozen view over NBD with its own client. The first backup reads every allocated block; later
ones read only the chunks a persistent dirty bitmap marks as changed since the previous snapshot
and take every other chunk id from that snapshot, so each snapshot still lists the whole disk.

The change tracking belongs to this repository: bitmaps are named ``hozon-<repository id>-…``,
and a snapshot records the bitmap that starts at its instant. Before trusting a bitmap Hozon
checks every way the chain can break and falls back to a full read, saying why in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from hozon import __version__
from hozon.backup.checkpoint import describe_vm, state_consumer, state_doc
from hozon.compress import DEFAULT_LEVEL
from hozon.errors import HozonError, QmpError, UsageError
from hozon.nbd import NbdClient
from hozon.nbd.qemu_nbd import QemuNbd
from hozon.repo.imagemap import ZERO_ID, decode_map, encode_map, image_disks, map_ids, split_maps, zero_mask
from hozon.repo.locks import confirm_held
from hozon.repo.pack import DATA, MAP
from hozon.repo.recover import adopt_orphan_packs
from hozon.repo.repository import Repository
from hozon.repo.snapshots import Snapshot, now_iso, this_host
from hozon.repo.writer import BlobWriter
from hozon.sources.qemu import QmpClient
from hozon.sources.qemu.disks import Disk, bitmaps, list_disks
from hozon.sources.qemu.fleece import DiskExport, PointInTime, cleanup_leftovers
from hozon.sources.qemu.guardian import Guardian
from hozon.sources.qemu.guest_agent import FREEZE_TIMEOUT, GuestQuiesce
from hozon.sources.qemu.vmstate import StateCapture, state_pipe

CHUNK_SIZE = 1024 * 1024  # fixed, aligned to disk offsets: a changed block maps to one chunk
READ_DEPTH = 4
ProgressCallback = Callable[[int, int], None]  # bytes done, bytes to read
BackupMode = Literal["auto", "full", "incremental"]  # auto: incremental when the chain allows


class MonitorSource(Protocol):
    """Reaches a running VM's monitor another way than a QMP socket (``hozon.sources.libvirt``)."""

    kind: str  # recorded as the snapshot's extra["source"]

    def connect(self) -> QmpClient: ...  # a session; backup_vm closes it
    def disks(self, qmp: QmpClient) -> list[Disk]: ...  # list_disks, named as the source names them
    def monitor_args(self) -> list[str]: ...  # how a guardian reaches the monitor (hozon.sources.qemu.guardian)
    def share_scratch(self, workdir: Path) -> None: ...  # let QEMU create and open files in workdir
    def guest_quiesce(self, freeze_timeout: float) -> GuestQuiesce: ...  # a freeze through its own agent channel
    def snapshot_extra(self, checkpoint: bool) -> dict[str, Any]: ...  # added to the snapshot's extra (domain_xml, …)


@dataclass
class ImageBackupOptions:
    qmp: str
    name: str | None = None
    mode: BackupMode = "auto"
    vm_config: str | None = None  # a file holding the QEMU command line
    tags: list[str] = field(default_factory=list)
    scratch_dir: str | None = None
    source: MonitorSource | None = None  # instead of qmp
    guest_agent: str | None = None  # the guest agent's unix socket: file systems frozen for the instant
    freeze: bool = False  # freeze them through guest_agent if given, else through the source's channel (libvirt)
    freeze_timeout: float = FREEZE_TIMEOUT
    checkpoint: bool = False  # also the VM's CPU, memory and device state at the instant (kind "checkpoint")
    compression: int | None = DEFAULT_LEVEL  # zstd level (compress.LEVELS); None: stored raw
    workers: int | None = None  # threads that hash, compress and seal (default: one per core)

    def __post_init__(self) -> None:
        if self.mode not in get_args(BackupMode):  # the command line's parser checks it; this is for callers
            raise UsageError(f"unknown mode {self.mode!r}; use auto, full or incremental")


@dataclass
class DiskPlan:
    disk: Disk
    since: str | None  # bitmap to read changes from; None: full read
    reason: str  # why this disk is read fully (empty for an incremental)
    parent_ids: npt.NDArray[np.uint8] | None = None


@dataclass
class ImageBackupResult:
    snapshot: Snapshot
    notes: list[str]


def bitmap_prefix(repo: Repository) -> str:
    return f"hozon-{repo.config['id'][:12]}-"


def vm_snapshots(repo: Repository, name: str) -> list[Snapshot]:
    snaps, _damaged = repo.readable_snapshots()
    return [s for s in snaps if s.kind in ("vm", "checkpoint") and s.extra.get("vm") == name]


def _vm_name(qmp: QmpClient, options: ImageBackupOptions) -> str:
    if options.name:
        return options.name
    answer = qmp.execute("query-name")
    name = answer.get("name") if isinstance(answer, dict) else None
    if not name:
        raise UsageError("the VM has no name (QEMU was started without -name)", hint="give one with --name NAME")
    return str(name)


def _parent_map(repo: Repository, disk_doc: dict[str, Any]) -> npt.NDArray[np.uint8]:
    parts = []
    for map_id in map_ids(disk_doc):
        parts.append(decode_map(repo.load_blob(map_id), f"map blob {map_id.hex()[:16]}"))
    return np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)


def plan_disks(repo: Repository, qmp: QmpClient, disks: list[Disk], parent: Snapshot | None,
               mode: BackupMode) -> list[DiskPlan]:
    """Full or incremental for each disk, with the reason whenever it must be full."""
    prefix = bitmap_prefix(repo)
    previous = {d["name"]: d for d in image_disks(parent.extra)} if parent else {}
    plans: list[DiskPlan] = []
    for disk in disks:
        if mode == "full":
            plans.append(DiskPlan(disk, None, "a full backup was asked for"))
            continue
        old = previous.get(disk.name)
        if parent is None:
            plans.append(DiskPlan(disk, None, "first backup of this VM (no earlier snapshot of it in this repository)"))
            continue
        if old is None:
            plans.append(DiskPlan(disk, None, "first backup of this disk (the previous snapshot has no such disk)"))
            continue
        reason = _chain_break(repo, qmp, disk, old, prefix)
        if reason:
            plans.append(DiskPlan(disk, None, reason))
            continue
        try:
            ids = _parent_map(repo, old)
        except HozonError as exc:
            plans.append(DiskPlan(disk, None, f"the previous snapshot's disk map cannot be read ({exc.message})"))
            continue
        live = ids[~zero_mask(ids)]
        if len(ids) * CHUNK_SIZE < disk.size or not all(repo.index.has_live(bytes(row)) for row in live):
            plans.append(DiskPlan(disk, None, "chunks of the previous snapshot were pruned from the repository"))
            continue
        plans.append(DiskPlan(disk, str(old["bitmap"]), "", ids))
    return plans


def full_read_notes(plans: list[DiskPlan]) -> list[str]:
    """One line per reason why disks were read fully (for when an incremental was asked for or expected)."""
    names: dict[str, list[str]] = {}
    for plan in plans:
        if plan.since is None:
            names.setdefault(plan.reason, []).append(plan.disk.name)
    return [f"{'disk' if len(disks) == 1 else 'disks'} {', '.join(disks)} read fully: {reason}"
            for reason, disks in names.items()]


def _chain_break(repo: Repository, qmp: QmpClient, disk: Disk, old: dict[str, Any], prefix: str) -> str:
    """Why the change tracking since the previous snapshot cannot be trusted ('' when it can)."""
    if int(old.get("size", -1)) != disk.size:
        return f"disk {disk.name} was resized from {old.get('size')} to {disk.size} bytes"
    if old.get("filename") and old["filename"] != disk.filename:
        return f"disk {disk.name} was replaced ({old['filename']} is now {disk.filename})"
    name = old.get("bitmap")
    if int(old.get("chunk_size", 0)) != CHUNK_SIZE or not name:
        return "the previous snapshot has no change tracking for this disk"
    present = bitmaps(qmp, disk)
    bitmap = present.get(str(name))
    if bitmap is None:
        ours = [n for n in present if n.startswith(prefix)]
        if ours:
            return (f"the change tracking of disk {disk.name} belongs to a newer snapshot that is no longer in"
                    " the repository (pruned)")
        return (f"disk {disk.name} has no change tracking bitmap {name} (VM restarted without it, or disk restored"
                " from elsewhere)")
    if bitmap.inconsistent:
        return f"the change tracking bitmap of disk {disk.name} is inconsistent (QEMU crashed)"
    if not bitmap.recording:
        return f"the change tracking bitmap of disk {disk.name} was disabled"
    if bitmap.busy:
        return f"the change tracking bitmap of disk {disk.name} is in use by another job"
    return ""


class _Progress:
    """Bytes read so far across all disks, passed on to the caller's callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def __call__(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


class _DiskReader:
    """Reads one disk through a connected NBD client and stores its chunks; gives its chunk id map."""

    def __init__(self, writer: BlobWriter, client: NbdClient, plan: DiskPlan, dirty_bitmap: str | None,
                 progress: Callable[[int], None]) -> None:
        self.writer = writer
        self.client = client
        self.plan = plan
        self.dirty_bitmap = dirty_bitmap  # the exported change map (incremental), or None
        self.progress = progress
        self.bytes_read = 0

    def chunks_to_read(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """(chunk indices to read, chunks that are all zero according to the allocation map)."""
        count = -(-self.plan.disk.size // CHUNK_SIZE)
        has_data = np.zeros(count, bool)
        for extent in self.client.allocation():
            if not extent.zero:
                has_data[extent.offset // CHUNK_SIZE : -(-(extent.offset + extent.length) // CHUNK_SIZE)] = True
        if self.plan.since is None or self.dirty_bitmap is None:
            return np.flatnonzero(has_data), ~has_data
        changed = np.zeros(count, bool)
        for offset, length in self.client.dirty_extents(self.dirty_bitmap):
            changed[offset // CHUNK_SIZE : -(-(offset + length) // CHUNK_SIZE)] = True
        return np.flatnonzero(changed & has_data), changed & ~has_data

    def run(self) -> npt.NDArray[np.uint8]:
        disk = self.plan.disk
        if self.client.size != disk.size:
            raise HozonError(f"disk {disk.name} is exported with {self.client.size} bytes, not {disk.size}")
        count = -(-disk.size // CHUNK_SIZE)
        ids = np.zeros((count, 32), np.uint8)
        if self.plan.parent_ids is not None:
            ids[:] = self.plan.parent_ids[:count]
        to_read, zeros = self.chunks_to_read()
        ids[zeros] = 0
        futures: list[tuple[int, Future[bytes | None]]] = []
        requests = ((int(i) * CHUNK_SIZE, min(CHUNK_SIZE, disk.size - int(i) * CHUNK_SIZE)) for i in to_read)
        for offset, data in self.client.read_many(requests, depth=READ_DEPTH):
            self.bytes_read += len(data)
            futures.append((offset // CHUNK_SIZE, self.writer.run(_store_unless_zero, self.writer, data)))
            self.progress(len(data))
            if len(futures) > 64:
                self._settle(futures, ids)
        self._settle(futures, ids)
        return ids

    @staticmethod
    def _settle(futures: list[tuple[int, Future[bytes | None]]], ids: npt.NDArray[np.uint8]) -> None:
        for index, future in futures:
            blob_id = future.result()
            ids[index] = np.frombuffer(blob_id or ZERO_ID, np.uint8)
        futures.clear()


def _read_export(writer: BlobWriter, export: DiskExport, plan: DiskPlan,
                 progress: Callable[[int], None]) -> tuple[npt.NDArray[np.uint8], int]:
    contexts = ["base:allocation"]
    if export.dirty_context:
        contexts.append(export.dirty_context)
    with NbdClient.connect_unix(export.socket, export=export.export, meta_contexts=contexts) as client:
        bitmap = export.dirty_context.removeprefix("qemu:dirty-bitmap:") if export.dirty_context else None
        reader = _DiskReader(writer, client, plan, bitmap, progress)
        return reader.run(), reader.bytes_read


_ZEROS = bytes(CHUNK_SIZE)


def _store_unless_zero(writer: BlobWriter, data: bytes) -> bytes | None:
    """Worker task: a chunk of zeros is recorded, never stored."""
    if data == _ZEROS[: len(data)]:
        return None
    return writer.store_blob(data, DATA)


def backup_vm(repo: Repository, options: ImageBackupOptions,
              progress: ProgressCallback | None = None) -> ImageBackupResult:
    """Back up every disk of the VM behind ``options.qmp`` into an open, locked repository."""
    if options.freeze and not options.guest_agent and options.source is None:
        raise UsageError("freezing the guest through a QMP socket needs the guest agent's socket",
                         hint="add --guest-agent SOCKET")
    if options.checkpoint and options.freeze:
        raise UsageError("a checkpoint keeps the guest's memory, page cache included; it needs no freeze")
    vm_config = Path(options.vm_config).read_text() if options.vm_config else None
    started = time.monotonic()
    adopt_orphan_packs(repo)  # chunks a killed or failed backup stored are reused, not stored again
    source = options.source
    with source.connect() if source else QmpClient.connect(options.qmp) as qmp:
        name = _vm_name(qmp, options)
        disks = source.disks(qmp) if source else list_disks(qmp)
        if not disks:
            raise HozonError(f"VM {name} has no writable disk to back up")
        history = vm_snapshots(repo, name)
        parent = history[-1] if history else None
        plans = plan_disks(repo, qmp, disks, parent, options.mode)
        expected_incremental = options.mode == "incremental" or (options.mode == "auto" and parent is not None)
        notes = full_read_notes(plans) if expected_incremental else []
        # The previous snapshot's bitmaps are no leftovers, even for disks read fully this time:
        # those are superseded once this snapshot is stored, and removed then (quietly).
        keep = {str(d["bitmap"]) for d in image_disks(parent.extra) if d.get("bitmap")} if parent else set()
        for leftover in cleanup_leftovers(qmp, bitmap_prefix(repo), keep=keep):
            notes.append(f"removed what an interrupted backup left in QEMU: {leftover}")
        new_bitmap = bitmap_prefix(repo) + os.urandom(4).hex()
        since = {p.disk.name: p.since for p in plans if p.since}
        scratch = os.path.abspath(options.scratch_dir or tempfile.gettempdir())  # QEMU resolves paths itself
        vm = describe_vm(qmp, vm_config) if options.checkpoint else {}
        advance = _Progress(sum(p.disk.size for p in plans) + int(vm.get("memory_bytes") or 0), progress)
        disk_docs: list[dict[str, Any]] = []
        with contextlib.ExitStack() as stack:
            monitor = source.monitor_args() if source else ["--qmp", os.path.abspath(options.qmp)]
            pipe = state_pipe() if options.checkpoint else None  # the guardian holds its read end too
            guardian = stack.enter_context(Guardian(monitor, bitmap_prefix(repo), sorted(keep),
                                                    drain=pipe[0] if pipe else None))
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hozon-", dir=scratch)))
            if source:
                source.share_scratch(workdir)
            quiesce = _quiesce(options, source)
            writer = BlobWriter(repo, options.workers, options.compression)
            stack.push(writer)  # its exit: flush on success, abort on error
            capture = (StateCapture(qmp, state_consumer(writer, repo.master.chunker_seed, advance), guardian.say,
                                    pipe) if pipe else None)
            if capture is not None:
                stack.callback(capture.close)
            point = PointInTime(qmp, disks, workdir, new_bitmap, since, quiesce=capture or quiesce)
            exports = stack.enter_context(point)
            if capture is not None:
                stack.callback(capture.close)  # again (it is idempotent): stop the stream before the fleecing goes
            notes += quiesce.notes if quiesce else []
            for plan in plans:  # while the state streams in on the capture's thread
                ids, bytes_read = _read_export(writer, exports[plan.disk.name], plan, advance)
                maps = [writer.store_blob(encode_map(part), MAP).hex() for part in split_maps(ids)]
                disk_docs.append(_disk_doc(plan, ids, maps, new_bitmap, bytes_read))
            state = state_doc(writer, *capture.finish()) if capture else None
            writer.close()
            snapshot = _snapshot(name, options, parent, disk_docs, str(qmp.version), vm_config,
                                 point.pause_seconds, writer, started, source=source.kind if source else "qmp",
                                 source_extra=source.snapshot_extra(options.checkpoint) if source else None)
            if quiesce is not None:
                snapshot.extra.update(consistency=quiesce.consistency,
                                      frozen_filesystems=quiesce.frozen_filesystems)
                snapshot.summary["frozen_ms"] = round(quiesce.frozen_seconds * 1000, 1)
            if capture is not None and state is not None:
                snapshot.kind = "checkpoint"
                state["was_running"] = capture.was_running
                snapshot.extra.update(state=state, consistency="checkpoint", **vm)
                snapshot.summary.update(pause_ms=round(capture.pause_seconds * 1000, 1),
                                        transaction_ms=snapshot.summary["pause_ms"], state_bytes=state["size"])
            confirm_held(repo)  # a lock that went stale meanwhile may have let a prune delete our packs
            repo.save_snapshot(snapshot)
            point.commit()
        if keep - set(since.values()):
            notes += _drop_superseded(qmp, bitmap_prefix(repo), new_bitmap)
    return ImageBackupResult(snapshot, notes)


def _drop_superseded(qmp: QmpClient, prefix: str, new_bitmap: str) -> list[str]:
    """Remove the previous snapshot's bitmaps of disks read fully: the snapshot just stored starts the
    chain now. A failure is a note, not an error (the snapshot is stored; the next backup removes them)."""
    try:
        cleanup_leftovers(qmp, prefix, keep={new_bitmap})
    except QmpError as exc:
        return [f"the previous snapshot's change tracking could not be removed ({exc.message}); the next backup "
                "removes it"]
    return []


def _quiesce(options: ImageBackupOptions, source: MonitorSource | None) -> GuestQuiesce | None:
    """The freeze around the instant: through the agent's socket, or the source's own channel to the agent."""
    if options.guest_agent:
        return GuestQuiesce.through_agent(options.guest_agent, options.freeze_timeout)
    if options.freeze and source is not None:
        return source.guest_quiesce(options.freeze_timeout)
    return None


def backup_images(repo: Repository, images: list[str], options: ImageBackupOptions,
                  progress: ProgressCallback | None = None) -> ImageBackupResult:
    """Back up the disk image files of a shut-off VM (qcow2, raw, …), each read fully.

    With the VM off there is no running QEMU to track changes; reading is full, but deduplication
    stores only what changed since the last snapshot.
    """
    if not options.name:
        raise UsageError("say how the VM is called in the repository", hint="add --name NAME")
    vm_config = Path(options.vm_config).read_text() if options.vm_config else None
    started = time.monotonic()
    disks = [image_disk(path) for path in images]
    adopt_orphan_packs(repo)  # chunks a killed or failed backup stored are reused, not stored again
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise UsageError("two images would get the same disk name; give files with different names")
    history = vm_snapshots(repo, options.name)
    parent = history[-1] if history else None
    plans = [DiskPlan(d, None, "a shut-off VM's images have no change tracking (that needs a running QEMU)")
             for d in disks]
    advance = _Progress(sum(d.size for d in disks), progress)
    disk_docs: list[dict[str, Any]] = []
    with BlobWriter(repo, options.workers, options.compression) as writer:
        for plan in plans:
            disk = plan.disk
            with QemuNbd(disk.filename, disk.format, read_only=True, meta_contexts=("base:allocation",)) as client:
                reader = _DiskReader(writer, client, plan, None, advance)
                ids = reader.run()
            maps = [writer.store_blob(encode_map(part), MAP).hex() for part in split_maps(ids)]
            disk_docs.append(_disk_doc(plan, ids, maps, None, reader.bytes_read))
        writer.close()
        snapshot = _snapshot(options.name, options, parent, disk_docs, None, vm_config, 0.0, writer, started,
                             source="image")
        confirm_held(repo)
        repo.save_snapshot(snapshot)
    return ImageBackupResult(snapshot, full_read_notes(plans) if options.mode == "incremental" else [])


def image_disk(path: str) -> Disk:
    """A disk image file as a Disk: named after the file (vda.qcow2 → vda), format and size from qemu-img."""
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True,
                             timeout=60)
    except FileNotFoundError as exc:
        raise HozonError("qemu-img is not installed", hint="install the Debian package qemu-utils") from exc
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HozonError(f"cannot open disk image {path}: {last}",
                         hint="if the VM is running, back it up with --qmp or --libvirt instead")
    info = json.loads(out.stdout)
    name = os.path.basename(path).split(".")[0] or "disk"
    return Disk(name=name, node="", filename=os.path.abspath(path), format=str(info["format"]),
                size=int(info["virtual-size"]))


def _disk_doc(plan: DiskPlan, ids: npt.NDArray[np.uint8], maps: list[str], bitmap: str | None,
              bytes_read: int) -> dict[str, Any]:
    disk = plan.disk
    zero_chunks = int(zero_mask(ids).sum())
    return {
        "name": disk.name, "size": disk.size, "format": disk.format, "filename": disk.filename,
        "node": disk.node, "chunk_size": CHUNK_SIZE, "maps": maps, "bitmap": bitmap,
        "mode": "incremental" if plan.since else "full", "reason": plan.reason,
        "bytes_read": bytes_read, "zero_bytes": min(zero_chunks * CHUNK_SIZE, disk.size),
    }


def _snapshot(name: str, options: ImageBackupOptions, parent: Snapshot | None, disks: list[dict[str, Any]],
              qemu_version: str | None, vm_config: str | None, pause: float, writer: BlobWriter,
              started: float, source: str, source_extra: dict[str, Any] | None = None) -> Snapshot:
    read = sum(d["bytes_read"] for d in disks)
    size = sum(d["size"] for d in disks)
    return Snapshot(
        time=now_iso(), hostname=this_host(), paths=[name], kind="vm", tree=None, tags=sorted(options.tags),
        parent=parent.id if parent else None, username=os.environ.get("USER", ""), program_version=__version__,
        summary={
            "disks": len(disks), "total_bytes": size, "bytes_read": read,
            "zero_bytes": sum(d["zero_bytes"] for d in disks),
            "data_blobs_new": writer.stats.blobs_new, "data_added": writer.stats.bytes_new,
            "data_added_stored": writer.stats.bytes_stored, "pause_ms": round(pause * 1000, 1),
            "duration_s": round(time.monotonic() - started, 3),
        },
        extra={
            "vm": name, "disks": disks, "qemu_version": qemu_version, "vm_config": vm_config,
            "consistency": "shut off" if source == "image" else "crash", "source": source,
            **(source_extra or {}),
        },
    )
