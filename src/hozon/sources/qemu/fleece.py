"""Point-in-time views of a running VM's disks, exported over NBD (image fleecing).

:class:`PointInTime` freezes every disk of a VM at one instant and serves that frozen view from
QEMU's own NBD server while the guest keeps running::

    with PointInTime(qmp, disks, scratch_dir, new_bitmap="hozon-2", since={"vda": "hozon-1"}) as exports:
        ...read exports["vda"] with NbdClient, its changes from exports["vda"].dirty_context...
        pit.commit()          # once the backup is stored: "hozon-2" takes over from "hozon-1"

How, for each disk (QEMU 7.2):

1. before the instant: an empty scratch qcow2 (``qemu-img create``) is opened as the *fleece node*
   ``hozon-fleece-<disk>``, whose backing is the disk's node. Reading it reads the disk.
2. the instant, one QMP ``transaction`` for all disks (QEMU drains the VM's I/O only inside it):
   a disabled, non-persistent bitmap on the fleece node receives a copy (``merge``) of the
   ``since`` bitmap — the changes up to the instant, frozen; ``new_bitmap`` is added to the disk,
   persistent and recording, for the next backup; and ``blockdev-backup sync=none`` from the disk
   to the fleece node starts *copy-before-write*: before the guest overwrites a cluster, its old
   content is copied into the scratch image, so the fleece node keeps showing the instant.
3. QEMU's NBD server exports each fleece node read-only, with the frozen bitmap.

The ``since`` bitmap is never disabled, changed or removed until :meth:`PointInTime.commit`, so
whatever fails — an error, a kill -9 of Hozon, a crash of QEMU — the next backup can still ask for
"everything changed since ``since``" and get a correct answer. Leaving the block always removes the
exports, the server, the jobs, the fleece nodes and the scratch files; without ``commit`` it also
removes ``new_bitmap``. What a killed Hozon leaves behind, :func:`cleanup_leftovers` removes.

Found on QEMU 7.2: an export finds a bitmap on a backing node of the exported node (this module
keeps the frozen copy on the fleece node itself all the same, so deleting the node deletes it); a
bitmap is ``busy`` while an export uses it; ``nbd-server-stop`` also ends ``block-export-add``
exports and unlinks the server's socket; a backup job puts a ``copy-before-write`` filter above the
disk's node, which ``query-block`` then shows as the device's node (``list_disks`` looks through it).
If the scratch directory fills up, copy-before-write fails and with it the guest's write (QEMU 7.2's
backup job has no ``on-cbw-error`` choice): give it room for what the guest may write meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from hozon.errors import HozonError, QmpCommandError, QmpError
from hozon.sources.qemu.disks import FILTER_DRIVERS, Disk, block_nodes, node_bitmaps
from hozon.sources.qemu.qmp import QmpClient

FLEECE_PREFIX: Final = "hozon-fleece-"  # fleece nodes, their block jobs and their NBD exports
SCRATCH_PREFIX: Final = "hozon-scratch-"  # the scratch image's file node under a fleece node
SCRATCH_SUFFIX: Final = ".fleece.qcow2"
DIRTY_BITMAP_CONTEXT: Final = "qemu:dirty-bitmap:"
CLEANUP_WAIT: Final = 10.0  # for an export or a job to go away
_NODE_NAME_MAX: Final = 31  # QEMU's limit on node names
_SOCKET_PATH_MAX: Final = 107  # sun_path, less the terminating NUL
_WELL_FORMED: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class DiskExport:
    """Where the frozen view of one disk is served.

    Open it with ``NbdClient.connect_unix(socket, export=export, meta_contexts=…)``; add
    ``dirty_context`` to the contexts to read the changes since the ``since`` bitmap
    (``client.dirty_extents(dirty_context.removeprefix("qemu:dirty-bitmap:"))``). ``dirty_context``
    is None when the disk is to be read in full.
    """

    disk: Disk
    socket: str
    export: str
    dirty_context: str | None


class PointInTime:
    """All of a VM's ``disks`` frozen at one instant and exported over NBD; a context manager.

    ``new_bitmap`` is the persistent bitmap created on every disk at the instant (it records the
    changes for the next backup; kept in QEMU's memory only on images that cannot store bitmaps:
    all but qcow2 v3). ``since`` maps a disk name to the existing bitmap whose changes are exported with that
    disk; a disk absent from it is read in full. ``scratch_dir`` holds the scratch images (and the
    NBD socket when its path is short enough), on a file system with room for what the guest writes
    during the backup.

    Leaving the block never raises over an exception already in flight; what could not be cleaned
    up is listed in :attr:`cleanup_failures` (and added as a note to that exception), and
    :func:`cleanup_leftovers` can remove it later. ``pause_seconds`` is how long the one
    ``transaction`` took: the VM's I/O is quiesced only inside it.

    ``quiesce``, a context manager, is entered right before that transaction and left right after
    it, also when it fails: ``GuestQuiesce`` (guest_agent.py) freezes the guest's file systems there.
    """

    def __init__(self, qmp: QmpClient, disks: Sequence[Disk], scratch_dir: Path,
                 new_bitmap: str, since: Mapping[str, str] | None = None,
                 quiesce: AbstractContextManager[object] | None = None) -> None:
        names = [d.name for d in disks]
        if not disks:
            raise ValueError("PointInTime needs at least one disk")
        if len(set(names)) != len(names):
            raise ValueError(f"disk names must be distinct: {names}")
        if not new_bitmap:
            raise ValueError("new_bitmap must not be empty")
        since = dict(since or {})
        if unknown := sorted(set(since) - set(names)):
            raise ValueError(f"since names disks that are not backed up: {unknown}")
        if new_bitmap in since.values() or f"{new_bitmap}-frozen" in since.values():
            raise ValueError(f"new_bitmap {new_bitmap!r} clashes with a since bitmap")
        self.qmp = qmp
        self.disks = tuple(disks)
        self.scratch_dir = Path(scratch_dir)
        self.new_bitmap = new_bitmap
        self.since = since
        self.pause_seconds = 0.0
        self.quiesce = quiesce
        self.cleanup_failures: list[str] = []
        self._frozen = f"{new_bitmap}-frozen"
        self._names = {d.name: _fleece_names(d.name) for d in self.disks}
        self._persistent: dict[str, bool] = {}
        self._entered = False
        self._committed = False
        self._scratch: list[Path] = []
        self._nodes: list[str] = []  # fleece nodes added
        self._instant = "not run"  # the transaction: "not run", "done", or "unknown" (no answer)
        self._server = False
        self._exports: list[str] = []
        self._socket: Path | None = None
        self._socket_dir: Path | None = None

    # -- entering --------------------------------------------------------------------------------

    def __enter__(self) -> dict[str, DiskExport]:
        if self._entered:
            raise RuntimeError("a PointInTime can be entered only once")
        self._entered = True
        try:
            return self._enter()
        except BaseException as exc:
            self._cleanup(exc)
            raise

    def _enter(self) -> dict[str, DiskExport]:
        nodes = block_nodes(self.qmp)
        granularity = self._check(nodes)
        try:
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HozonError(f"cannot create the scratch directory {self.scratch_dir}: "
                             f"{exc.strerror or exc}") from None
        for disk in self.disks:
            fleece, scratch_node = self._names[disk.name]
            path = self.scratch_dir / f"{_file_safe(self.new_bitmap)}-{_file_safe(disk.name)}{SCRATCH_SUFFIX}"
            self._create_scratch(path, disk.size)
            self._nodes.append(fleece)  # before asking: a command without an answer may still have run
            try:
                self.qmp.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": fleece, "backing": disk.node,
                    "file": {"driver": "file", "node-name": scratch_node, "filename": str(path)},
                })
            except QmpCommandError:
                self._nodes.remove(fleece)  # refused: not ours (the name may even be someone else's)
                raise

        actions: list[dict[str, Any]] = []
        for disk in self.disks:
            fleece = self._names[disk.name][0]
            if disk.name in self.since:
                actions += [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": fleece, "name": self._frozen, "persistent": False, "disabled": True,
                              "granularity": granularity[disk.name]}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": fleece, "target": self._frozen,
                              "bitmaps": [{"node": disk.node, "name": self.since[disk.name]}]}},
                ]
            actions += [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": disk.node, "name": self.new_bitmap,
                          "persistent": self._persistent[disk.name]}},
                {"type": "blockdev-backup",
                 "data": {"job-id": fleece, "device": disk.node, "target": fleece, "sync": "none"}},
            ]
        with self.quiesce if self.quiesce is not None else contextlib.nullcontext():
            start = time.monotonic()
            try:
                self.qmp.transaction(actions)
            except QmpCommandError:
                raise  # QEMU refused it: nothing of it happened
            except BaseException:
                self._instant = "unknown"
                raise
            finally:
                self.pause_seconds = time.monotonic() - start
            self._instant = "done"

        socket_path = self._socket_path()
        try:
            self.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket_path)}}})
        except QmpCommandError as exc:
            if "already running" in exc.desc:
                raise QmpError("QEMU's NBD server is already running, so Hozon cannot start its own",
                               hint="another backup of this VM may be running; if a Hozon was killed, "
                                    "remove what it left behind first") from None
            raise
        self._server = True
        exports: dict[str, DiskExport] = {}
        for disk in self.disks:
            fleece = self._names[disk.name][0]
            arguments: dict[str, Any] = {"type": "nbd", "id": fleece, "node-name": fleece, "name": disk.name,
                                         "writable": False}
            if disk.name in self.since:
                arguments["bitmaps"] = [self._frozen]
            self._exports.append(fleece)
            self.qmp.execute("block-export-add", arguments)
            context = DIRTY_BITMAP_CONTEXT + self._frozen if disk.name in self.since else None
            exports[disk.name] = DiskExport(disk, str(socket_path), disk.name, context)
        return exports

    def _check(self, nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """Fail clearly before anything is created; the granularity of each ``since`` bitmap."""
        granularity: dict[str, int] = {}
        for disk in self.disks:
            info = nodes.get(disk.node)
            if info is None:
                raise QmpError(f"disk {disk.name} of the VM has no node {disk.node} any more; was it unplugged?")
            fleece, scratch_node = self._names[disk.name]
            if fleece in nodes or scratch_node in nodes:
                raise QmpError(f"QEMU still holds the fleecing node {fleece} of an earlier backup of disk "
                               f"{disk.name}", hint="another backup may be running; if a Hozon was killed, remove "
                                                    "what it left behind first")
            image = info.get("image")
            image = image if isinstance(image, dict) else {}
            size = image.get("virtual-size")
            if size != disk.size:
                raise QmpError(f"disk {disk.name} is now {size} bytes, not {disk.size}",
                               hint="it was resized: list the disks again")
            specific = image.get("format-specific")
            compat = specific.get("data", {}).get("compat") if isinstance(specific, dict) else None
            self._persistent[disk.name] = disk.format == "qcow2" and compat != "0.10"  # v2 stores no bitmaps
            found = node_bitmaps(info)
            if self.new_bitmap in found:
                raise QmpError(f"disk {disk.name} already has a bitmap named {self.new_bitmap}")
            name = self.since.get(disk.name)
            if name is None:
                continue
            bitmap = found.get(name)
            if bitmap is None:
                raise QmpError(f"disk {disk.name} has no bitmap {name} to take the changes from",
                               hint="read the whole disk instead")
            if bitmap.inconsistent:
                raise QmpError(f"bitmap {name} of disk {disk.name} is inconsistent (QEMU did not stop cleanly) "
                               "and cannot be trusted", hint="remove it and read the whole disk instead")
            if bitmap.busy:
                raise QmpError(f"bitmap {name} of disk {disk.name} is in use by another operation")
            granularity[disk.name] = bitmap.granularity
        return granularity

    def _create_scratch(self, path: Path, size: int) -> None:
        self._scratch.append(path)
        try:
            done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                                  capture_output=True, text=True, timeout=60, check=False)
        except FileNotFoundError:
            raise HozonError("qemu-img is not installed; Hozon needs it to create scratch images",
                             hint="install QEMU's tools (Debian: qemu-utils)") from None
        except subprocess.TimeoutExpired:
            raise HozonError(f"qemu-img did not create the scratch image {path} within 60 s") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise HozonError(f"qemu-img could not create the scratch image {path}: "
                             f"{message[-1] if message else f'exit code {done.returncode}'}")

    def _socket_path(self) -> Path:
        path = self.scratch_dir / f"{_file_safe(self.new_bitmap)}.nbd.sock"
        if len(os.fsencode(path.absolute())) > _SOCKET_PATH_MAX:
            # unix socket paths are short; QEMU must then run as Hozon's user to create it here
            self._socket_dir = Path(tempfile.mkdtemp(prefix="hozon-nbd-"))
            path = self._socket_dir / "nbd.sock"
        self._socket = path.absolute()
        return self._socket

    # -- committing and leaving ------------------------------------------------------------------

    def commit(self) -> None:
        """The backup is stored: keep ``new_bitmap`` and remove each ``since`` bitmap.

        From here on, leaving the block keeps ``new_bitmap`` whatever happens. A ``since`` bitmap
        that cannot be removed raises :class:`QmpError` (after trying the others); it is only a
        leftover, which :func:`cleanup_leftovers` removes later.
        """
        if self._instant != "done":
            raise RuntimeError("commit() is for a PointInTime that was entered")
        self._committed = True
        failures: list[str] = []
        for disk in self.disks:
            name = self.since.get(disk.name)
            if name is not None:
                _attempt(failures, f"remove bitmap {name} from disk {disk.name}", self.qmp,
                         "block-dirty-bitmap-remove", {"node": disk.node, "name": name})
        if failures:
            raise QmpError(f"could not {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1
                                                         else ""))

    @property
    def committed(self) -> bool:
        return self._committed

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cleanup(exc)

    def _cleanup(self, exc: BaseException | None) -> None:
        failures: list[str] = []
        qmp = self.qmp
        started = self._instant != "not run"

        for export in reversed(self._exports):
            _attempt(failures, f"remove NBD export {export}", qmp, "block-export-del",
                     {"id": export, "mode": "hard"}, wait=partial(_wait_export_gone, qmp, export))
        self._exports.clear()
        if self._server:
            _attempt(failures, "stop QEMU's NBD server", qmp, "nbd-server-stop")
            self._server = False
        if started:
            for disk in self.disks:
                job = self._names[disk.name][0]
                _attempt(failures, f"cancel block job {job}", qmp, "block-job-cancel",
                         {"device": job, "force": True}, wait=partial(_wait_job_gone, qmp, job))
        for node in reversed(self._nodes):
            _attempt(failures, f"delete node {node}", qmp, "blockdev-del", {"node-name": node}, retry_busy=True)
        self._nodes.clear()
        if started and not self._committed:
            for disk in self.disks:
                _attempt(failures, f"remove bitmap {self.new_bitmap} from disk {disk.name}", qmp,
                         "block-dirty-bitmap-remove", {"node": disk.node, "name": self.new_bitmap})
        self._instant = "cleaned" if started else self._instant

        for path in self._scratch:
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                failures.append(f"delete scratch image {path}: {error.strerror or error}")
        self._scratch.clear()
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.unlink(missing_ok=True)  # QEMU unlinks it itself when it stops the server
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

        self.cleanup_failures.extend(failures)
        if failures and exc is not None:
            exc.add_note("Hozon could not clean up after the backup: " + "; ".join(failures))


def cleanup_leftovers(qmp: QmpClient, prefix: str, keep: Collection[str] = ()) -> list[str]:
    """Remove what a killed Hozon left in QEMU; describe what was removed.

    Removed: NBD exports of fleece nodes, QEMU's NBD server when one of those was found and no
    other export remains, fleecing block jobs, fleece nodes (``hozon-fleece-*``) with their scratch
    images, and every bitmap whose name starts with ``prefix`` and is not in ``keep`` (keep the
    bitmap the last stored backup relies on). Every step is tried; if any fails, :class:`QmpError`
    is raised at the end naming the first failure.
    """
    if not prefix:
        raise ValueError("cleanup_leftovers needs a non-empty bitmap prefix")
    removed: list[str] = []
    failures: list[str] = []
    found_ours = False

    for export in _list(qmp.execute("query-block-exports")):
        ident, node = str(export.get("id", "")), str(export.get("node-name", ""))
        if ident.startswith(FLEECE_PREFIX) or node.startswith(FLEECE_PREFIX):
            found_ours = True
            if _attempt(failures, f"remove NBD export {ident}", qmp, "block-export-del",
                        {"id": ident, "mode": "hard"}, wait=partial(_wait_export_gone, qmp, ident)):
                removed.append(f"NBD export {ident}")

    jobs = [str(j.get("device", "")) for j in _list(qmp.execute("query-block-jobs"))]
    nodes = block_nodes(qmp)
    fleece_nodes = sorted(n for n in nodes if n.startswith(FLEECE_PREFIX))
    found_ours = found_ours or any(j.startswith(FLEECE_PREFIX) for j in jobs) or bool(fleece_nodes)
    if found_ours and not any(e.get("type") == "nbd" for e in _list(qmp.execute("query-block-exports"))):
        try:
            qmp.execute("nbd-server-stop")
            removed.append("QEMU's NBD server")
        except QmpCommandError as exc:
            if not _gone(exc):
                failures.append(f"stop QEMU's NBD server: {exc.desc}")

    for job in jobs:
        if job.startswith(FLEECE_PREFIX) and _attempt(failures, f"cancel block job {job}", qmp, "block-job-cancel",
                                                      {"device": job, "force": True},
                                                      wait=partial(_wait_job_gone, qmp, job)):
            removed.append(f"block job {job}")

    scratch = {name: str(info.get("file", "")) for name, info in nodes.items()
               if name.startswith(SCRATCH_PREFIX) and info.get("drv") == "file"}
    for node in fleece_nodes:
        if _attempt(failures, f"delete node {node}", qmp, "blockdev-del", {"node-name": node}, retry_busy=True):
            removed.append(f"node {node}")
    if fleece_nodes:
        left = block_nodes(qmp)
        for name, path in sorted(scratch.items()):
            if name in left or not path.endswith(SCRATCH_SUFFIX):
                continue
            try:
                os.unlink(path)
                removed.append(f"scratch image {path}")
            except FileNotFoundError:
                pass
            except OSError as error:  # e.g. a QEMU of another user, or on another host
                failures.append(f"delete scratch image {path}: {error.strerror or error}")

    for name, info in sorted(block_nodes(qmp).items()):
        if str(info.get("drv", "")) in FILTER_DRIVERS:
            continue  # a filter shows its child's bitmaps
        for bitmap in sorted(node_bitmaps(info)):
            if bitmap.startswith(prefix) and bitmap not in keep and _attempt(
                    failures, f"remove bitmap {bitmap} from node {name}", qmp, "block-dirty-bitmap-remove",
                    {"node": name, "name": bitmap}):
                removed.append(f"bitmap {bitmap} on node {name}")

    if failures:
        raise QmpError(f"could not {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""),
                       hint="removed meanwhile: " + (", ".join(removed) or "nothing"))
    return removed


# -- internals -----------------------------------------------------------------------------------


def _fleece_names(disk: str) -> tuple[str, str]:
    """The fleece node's name (also its job's and export's id) and its scratch file node's name."""
    suffix = disk
    if not _WELL_FORMED.match(disk) or len(SCRATCH_PREFIX) + len(disk) > _NODE_NAME_MAX:
        suffix = "h" + hashlib.sha256(disk.encode()).hexdigest()[:12]
    return FLEECE_PREFIX + suffix, SCRATCH_PREFIX + suffix


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip(".") or "_"


def _gone(exc: QmpCommandError) -> bool:
    """QEMU says the thing to remove is not there (any more)."""
    desc = exc.desc.lower()
    return exc.error_class in ("DeviceNotFound", "DeviceNotActive") or any(
        words in desc for words in ("not found", "not running", "failed to find", "no active", "cannot find"))


def _attempt(failures: list[str], what: str, qmp: QmpClient, command: str, arguments: dict[str, Any] | None = None,
             wait: Callable[[], None] | None = None, retry_busy: bool = False) -> bool:
    """Run one cleanup command; True if it removed something. A thing already gone is no failure.

    Once the monitor's connection is gone (QEMU quit), the first step records why and the later
    ones are skipped.
    """
    if qmp.closed and failures:
        return False
    deadline = time.monotonic() + 2.0
    while True:
        try:
            qmp.execute(command, arguments)
            if wait is not None:
                wait()
            return True
        except QmpCommandError as exc:
            if _gone(exc):
                return False
            if retry_busy and ("busy" in exc.desc or "in use" in exc.desc) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            failures.append(f"{what}: {exc.desc}")
            return False
        except QmpError as exc:  # no answer, or QEMU went away
            failures.append(f"{what}: {exc.message}")
            return False


def _wait_export_gone(qmp: QmpClient, export: str) -> None:
    _wait_gone(qmp, "BLOCK_EXPORT_DELETED", {"id": export},
               lambda: any(e.get("id") == export for e in _list(qmp.execute("query-block-exports"))),
               f"NBD export {export}")


def _wait_job_gone(qmp: QmpClient, job: str) -> None:
    _wait_gone(qmp, "JOB_STATUS_CHANGE", {"id": job, "status": "null"},
               lambda: any(j.get("device") == job for j in _list(qmp.execute("query-block-jobs"))),
               f"block job {job}")


def _wait_gone(qmp: QmpClient, event: str, match: Mapping[str, Any], present: Callable[[], bool], what: str) -> None:
    """Wait until ``present()`` is false, woken by ``event`` (checked again every half second)."""
    deadline = time.monotonic() + CLEANUP_WAIT
    while present():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QmpError(f"{what} was still there {CLEANUP_WAIT:g} s after QEMU was asked to remove it")
        with contextlib.suppress(QmpError):
            qmp.wait_event(event, timeout=min(remaining, 0.5), match=match)
        if qmp.closed:
            raise QmpError(f"QEMU's monitor went away while Hozon waited for {what} to go")


def _list(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
