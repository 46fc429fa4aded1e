"""A running VM's CPU, memory and device state, streamed out at the instant its disks are fixed.

:class:`StateCapture` is what a checkpoint puts around the fleecing transaction (``PointInTime(…,
quiesce=capture)``)::

    stop                                   the guest pauses; QEMU drains its I/O
    transaction (fleece every disk)        the disks' instant                      (PointInTime)
    getfd + migrate fd:hozon-vmstate       background-snapshot: device state now, RAM copy-on-write,
                                           then QEMU itself resumes the guest, which runs on while
                                           its memory streams to Hozon

QEMU's ``background-snapshot`` migration capability saves the device state at once and then
sends every RAM page as it was at that moment: a page the guest is about to overwrite is sent
first (userfaultfd write protection), so the guest never waits for the whole stream. The stream
goes into a pipe whose write end QEMU got over the monitor (``getfd``, SCM_RIGHTS; through
libvirt, ``qemu-monitor-command --pass-fds``); Hozon reads the other end (:attr:`stream`) and
stores it as it comes, so no file of the memory's size is ever written.

Why ``fd:`` rather than ``exec:cat > FIFO``: no shell and no FIFO in a directory QEMU's user
must reach, and it works under libvirt, whose seccomp sandbox (``-sandbox …,spawn=deny``) stops
QEMU from starting any program, ``exec:`` migration included.

The guest is paused only from ``stop`` until QEMU runs it again (:attr:`pause_seconds`, a few
ms here). Hozon must not send ``cont`` itself once the migration started: on QEMU 7.2 a ``cont``
that races QEMU's own resume fails the snapshot ("failed to save SaveStateEntry … ram: -5") or
hangs it, about one time in seven here. Hozon sends ``cont`` only when the transaction or the
migration failed before QEMU resumed the guest. After the stream ended, :meth:`finish` waits for
QEMU to report the migration complete; whatever happens, leaving turns the capability off again (it would change the next real
migration of the VM) and cancels a migration still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import select
import time
from types import TracebackType
from typing import Any, Final

from hozon.errors import QmpCommandError, QmpError
from hozon.sources.qemu.qmp import QmpClient

STATE_FD_NAME: Final = "hozon-vmstate"
CAPABILITY: Final = "background-snapshot"
PIPE_SIZE: Final = 1 << 20  # fewer, larger reads of the stream
FINISH_TIMEOUT: Final = 60.0  # from the stream's end to QEMU's "completed"
RESUME_TIMEOUT: Final = 10.0  # for QEMU to resume the guest after saving its device state
STALL_CHECK: Final = 1.0  # a stream silent this long: ask QEMU whether the migration failed
_DONE: Final = ("completed", "failed", "cancelled")


class StateCapture:
    """Pauses the VM around the block (the disks' instant) and starts streaming its state at the end.

    Once the block is left without error, read the stream with :meth:`readinto` to its end, then
    call :meth:`finish`. :meth:`close` (or ``with capture:`` around all of it) cleans up in any case.
    """

    def __init__(self, qmp: QmpClient) -> None:
        self.qmp = qmp
        self.pause_seconds = 0.0
        self.was_running = False
        self.stream: io.FileIO | None = None
        self._stopped_at: float | None = None
        self._migrating = False
        self._capability = False
        self._closed = False

    # -- around the transaction (PointInTime's quiesce) ----------------------------------------

    def __enter__(self) -> StateCapture:
        status = self.qmp.execute("query-status")
        if isinstance(status, dict) and status.get("status") in ("inmigrate", "postmigrate", "finish-migrate"):
            raise QmpError(f"the VM is being migrated (state {status['status']}); a checkpoint cannot be "
                           "taken now")
        self._set_capability(True)
        self.was_running = bool(isinstance(status, dict) and status.get("running"))
        if self.was_running:
            self._stopped_at = time.monotonic()
            self.qmp.execute("stop")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            try:
                self._start_stream()
            except BaseException:
                self._resume()
                raise
            self._wait_resumed()
        else:
            self._resume()

    def _start_stream(self) -> None:
        read_end, write_end = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self.qmp.pass_fd(STATE_FD_NAME, write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # QEMU holds its own copy now: the stream ends when QEMU closes it
        self.stream = io.FileIO(read_end, "rb")
        self._migrating = True  # before asking: a command without an answer may still have run
        try:
            self.qmp.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        except QmpCommandError:
            self._migrating = False
            with contextlib.suppress(QmpError):
                self.qmp.execute("closefd", {"fdname": STATE_FD_NAME})
            raise

    def _wait_resumed(self) -> None:
        """QEMU resumes the guest itself once its RAM is write-protected (``bg_migration_vm_start_bh``).

        A ``cont`` of Hozon's racing that would run the guest's devices against memory already
        protected (QEMU 7.2 then fails the snapshot, or hangs): so wait, and send one only if the
        migration ended without resuming it.
        """
        if self._stopped_at is None:
            return
        deadline = time.monotonic() + RESUME_TIMEOUT
        while True:
            status = self.qmp.execute("query-status")
            if isinstance(status, dict) and status.get("running"):
                self.pause_seconds = time.monotonic() - self._stopped_at
                self._stopped_at = None
                return
            info = self.qmp.execute("query-migrate")
            over = isinstance(info, dict) and info.get("status") in _DONE
            if over or time.monotonic() > deadline:
                self._resume()
                return
            time.sleep(0.001)

    def _resume(self) -> None:
        if self._stopped_at is None:
            return
        try:
            self.qmp.execute("cont")
        finally:
            self.pause_seconds = time.monotonic() - self._stopped_at
            self._stopped_at = None

    # -- after the stream ----------------------------------------------------------------------

    def readinto(self, buffer: memoryview) -> int:
        """Read the next part of the stream (0 at its end); a migration that failed meanwhile raises.

        QEMU may leave the pipe open after a failed migration, so a plain read could wait forever.
        """
        if self.stream is None:
            raise QmpError("the VM's state stream was not started")
        while not select.select([self.stream], [], [], STALL_CHECK)[0]:
            info = self.qmp.execute("query-migrate")
            if isinstance(info, dict) and info.get("status") in ("failed", "cancelled"):
                self._migrating = False
                raise QmpError(f"QEMU could not save the VM's state: {info.get('error-desc', info['status'])}")
        return self.stream.readinto(buffer) or 0

    def finish(self, timeout: float = FINISH_TIMEOUT) -> dict[str, Any]:
        """Wait for QEMU to call the migration complete; its ``query-migrate`` answer. Raises if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                self._migrating = False
                return dict(info)
            if status in ("failed", "cancelled"):
                self._migrating = False
                detail = info.get("error-desc", status)
                raise QmpError(f"QEMU could not save the VM's state: {detail}")
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU did not finish saving the VM's state within {timeout:g} s after the stream "
                               f"ended (migration status {status})")
            time.sleep(0.02)

    def close(self) -> None:
        """Cancel an unfinished stream, turn the capability off, close the pipe; safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            self.stream.close()  # QEMU's writes now fail: the migration ends as failed
        with contextlib.suppress(QmpError):
            if self._migrating:
                self.qmp.execute("migrate_cancel")
                self._wait_migration_over()
            if self.was_running and self.qmp.execute("query-status").get("status") == "paused":
                self.qmp.execute("cont")  # a migration that failed while the VM was stopped leaves it so
            if self._capability:
                self._set_capability(False)

    def _wait_migration_over(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            info = self.qmp.execute("query-migrate")
            if not isinstance(info, dict) or info.get("status") in (*_DONE, None):
                return
            time.sleep(0.02)

    def _set_capability(self, on: bool) -> None:
        try:
            self.qmp.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": CAPABILITY, "state": on}]})
        except QmpCommandError as exc:
            if on:
                raise QmpError(f"QEMU cannot stream the VM's state in the background: {exc.desc}",
                               hint="checkpoints need QEMU 6.0 or newer on a kernel with userfaultfd write "
                                    "protection (Linux 5.7+)") from None
            raise
        self._capability = on
