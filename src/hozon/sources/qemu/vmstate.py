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
first (userfaultfd write protection), and the writer waits until it is. The stream goes into a
pipe whose write end QEMU got over the monitor (``getfd``, SCM_RIGHTS; through libvirt,
``qemu-monitor-command --pass-fds``). A thread of Hozon's (the *consumer*, which stores the
stream as it comes) reads the other end from the moment ``migrate`` is sent, whatever else
Hozon does meanwhile: if nobody read, the pipe would fill, QEMU's migration thread would wait
on it, and any write to guest memory would wait on that thread — QEMU's main loop included,
which then answers no monitor command (seen here: the checkpoint hung while Hozon waited for
``query-status``). No file of the memory's size is ever written.

Why ``fd:`` rather than ``exec:cat > FIFO``: no shell and no FIFO in a directory QEMU's user
must reach, and it works under libvirt, whose seccomp sandbox (``-sandbox …,spawn=deny``) stops
QEMU from starting any program, ``exec:`` migration included.

The guest is paused only from ``stop`` until QEMU runs it again (:attr:`pause_seconds`, a few
ms here). QEMU 7.2 resumes it itself once the RAM is write-protected (``bg_migration_vm_start_bh``
calls ``vm_start``), so Hozon sends no ``cont`` after a ``migrate`` that started; it sends one
only when the transaction or the migration failed first. :meth:`finish` waits for the consumer
and for QEMU to report the migration complete; whatever happens, :meth:`close` turns the
capability off again (it would change the next real migration of the VM) and cancels a
migration still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

from hozon.errors import QmpCommandError, QmpError
from hozon.sources.qemu.qmp import QmpClient

STATE_FD_NAME: Final = "hozon-vmstate"
CAPABILITY: Final = "background-snapshot"
PIPE_SIZE: Final = 1 << 20  # fewer, larger reads of the stream
FINISH_TIMEOUT: Final = 60.0  # from the stream's end to QEMU's "completed"
RESUME_TIMEOUT: Final = 10.0  # for QEMU to resume the guest after saving its device state
MIGRATION_TIMEOUT: Final = 600.0  # for an unfinished stream, drained, to end
STALL_CHECK: Final = 1.0  # while the consumer reads, ask QEMU this often whether the migration failed
_DONE: Final = ("completed", "failed", "cancelled")
T = TypeVar("T")


def state_pipe() -> tuple[int, int]:
    """The pipe the state streams through: (read end, write end), a large buffer."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read_end, write_end


def drain(fd: int) -> None:
    """Read a state stream to its end and drop it, so that QEMU's migration thread never waits on it."""
    with contextlib.suppress(OSError):
        while os.read(fd, PIPE_SIZE):
            pass


def wait_migration_over(qmp: QmpClient, timeout: float) -> None:
    """Until the migration is no longer running; cancelled once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    cancelled = False
    while qmp.execute("query-migrate").get("status") in ("setup", "active", "device", "cancelling"):
        if time.monotonic() > deadline:
            if cancelled:
                raise QmpError("QEMU's state migration did not end, not even when cancelled")
            qmp.execute("migrate_cancel")
            cancelled, deadline = True, time.monotonic() + 10
        time.sleep(0.02)


class StateCapture(Generic[T]):
    """Pauses the VM around the block (the disks' instant) and starts streaming its state at the end.

    ``consume(stream)`` runs on a thread of its own from the moment the stream starts; it reads
    the stream (``readinto``) to its end and returns what :meth:`finish` gives back. :meth:`close`
    (or ``with``) cleans up in any case.
    """

    def __init__(self, qmp: QmpClient, consume: Callable[[io.FileIO], T],
                 tell: Callable[[str], None] = lambda _word: None, pipe: tuple[int, int] | None = None) -> None:
        self.qmp = qmp
        self.consume = consume
        self.tell = tell  # "paused" / "resumed", for a guardian that resumes the guest if Hozon dies
        self.pause_seconds = 0.0
        self.was_running = False
        self.stream: io.FileIO | None = None
        self._stopped_at: float | None = None
        self._migrating = False
        self._capability = False
        self._closed = False
        self._consumer: threading.Thread | None = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self._pipe = pipe  # (read end, write end), this object's to close; made when the stream starts if None

    # -- around the transaction (PointInTime's quiesce) ----------------------------------------

    def __enter__(self) -> StateCapture[T]:
        status = self.qmp.execute("query-status")
        if isinstance(status, dict) and status.get("status") == "prelaunch":
            # QEMU 7.2's background snapshot would then abort QEMU ("invalid runstate transition")
            raise QmpError("the VM has not been started yet (QEMU -S): there is no running state to keep",
                           hint="start it first (QMP cont), or back up its disks with: hozon vm backup")
        if isinstance(status, dict) and status.get("status") in ("inmigrate", "postmigrate", "finish-migrate"):
            raise QmpError(f"the VM is being migrated (state {status['status']}); a checkpoint cannot be "
                           "taken now")
        self._set_capability(True)
        self.was_running = bool(isinstance(status, dict) and status.get("running"))
        if self.was_running:
            self.tell("paused")
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
        read_end, write_end = self._pipe or state_pipe()
        self._pipe = None
        try:
            self.qmp.pass_fd(STATE_FD_NAME, write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # QEMU holds its own copy now: the stream ends when QEMU closes it
        self.stream = io.FileIO(read_end, "rb")
        self._consumer = threading.Thread(target=self._consume, name="hozon-vmstate", daemon=True)
        self._consumer.start()  # reading from now on: see the module's docstring
        self._migrating = True  # before asking: a command without an answer may still have run
        try:
            self.qmp.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        except QmpCommandError:
            self._migrating = False
            with contextlib.suppress(QmpError):
                self.qmp.execute("closefd", {"fdname": STATE_FD_NAME})
            raise

    def _consume(self) -> None:
        assert self.stream is not None
        try:
            self._result = self.consume(self.stream)
        except BaseException as exc:  # raised in the caller by finish()
            self._error = exc

    def _wait_resumed(self) -> None:
        """QEMU resumes the guest itself once its RAM is write-protected (``bg_migration_vm_start_bh``).

        A ``cont`` of Hozon's racing that would run the guest's devices against memory already
        protected (QEMU 7.2 then fails the snapshot, or hangs): so wait, and send one only if the
        migration ended without resuming it.
        """
        deadline = time.monotonic() + RESUME_TIMEOUT
        while True:
            status = self.qmp.execute("query-status")
            if isinstance(status, dict) and status.get("running"):
                if self._stopped_at is None:  # paused before the checkpoint: QEMU 7.2 ran it all the same
                    self.qmp.execute("stop")
                    return
                self.pause_seconds = time.monotonic() - self._stopped_at
                self._stopped_at = None
                self.tell("resumed")
                return
            info = self.qmp.execute("query-migrate")
            over = isinstance(info, dict) and info.get("status") in _DONE
            if over or time.monotonic() > deadline:
                self._resume()  # nothing when the guest was paused before
                return
            time.sleep(0.001)

    def _resume(self) -> None:
        if self._stopped_at is None:
            return
        try:
            self.qmp.execute("cont")
            self.tell("resumed")
        finally:
            self.pause_seconds = time.monotonic() - self._stopped_at
            self._stopped_at = None

    # -- after the stream ----------------------------------------------------------------------

    def finish(self, timeout: float = FINISH_TIMEOUT) -> tuple[T, dict[str, Any]]:
        """Wait for the consumer and for QEMU to call the migration complete.

        What ``consume`` returned, and QEMU's ``query-migrate`` answer. A migration that failed
        (QEMU may then leave the pipe open, so the consumer would wait forever) or a consumer that
        failed raises.
        """
        if self._consumer is None:
            raise QmpError("the VM's state stream was not started")
        while self._consumer.is_alive():
            self._consumer.join(STALL_CHECK)
            if self._consumer.is_alive():
                self._raise_if_failed()
        if self._error is not None:
            raise self._error
        deadline = time.monotonic() + timeout
        while True:
            info = self._raise_if_failed()
            if info.get("status") == "completed":
                self._migrating = False
                assert self._result is not None
                return self._result, info
            if time.monotonic() > deadline:
                raise QmpError(f"QEMU did not finish saving the VM's state within {timeout:g} s after the stream "
                               f"ended (migration status {info.get('status')})")
            time.sleep(0.02)

    def _raise_if_failed(self) -> dict[str, Any]:
        info = self.qmp.execute("query-migrate")
        info = dict(info) if isinstance(info, dict) else {}
        if info.get("status") in ("failed", "cancelled"):
            self._migrating = False
            raise QmpError(f"QEMU could not save the VM's state: {info.get('error-desc', info['status'])}")
        return info

    def close(self) -> None:
        """End an unfinished stream, turn the capability off, close the pipe; safe to repeat.

        An unfinished stream is read to its end and dropped rather than cancelled: QEMU 7.2 stops
        serving the guest's write faults as soon as a background snapshot fails or is cancelled,
        before it lifts the write protection, and a guest write in between hangs QEMU. Only a
        stream that does not end within ``MIGRATION_TIMEOUT`` is cancelled.
        """
        if self._closed:
            return
        self._closed = True
        if self.stream is not None and self._consumer is not None and not self._consumer.is_alive():
            stream = self.stream
            threading.Thread(target=drain, args=(stream.fileno(),), name="hozon-vmstate-drain", daemon=True).start()
        with contextlib.suppress(QmpError):
            if self._migrating:
                wait_migration_over(self.qmp, MIGRATION_TIMEOUT)
            if self.was_running and self.qmp.execute("query-status").get("status") == "paused":
                self.qmp.execute("cont")  # a migration that failed while the VM was stopped leaves it so
            if self._capability:
                self._set_capability(False)
        if self._consumer is not None:
            self._consumer.join(STALL_CHECK)  # it ends with the stream
        if self.stream is not None:
            self.stream.close()
        for fd in self._pipe or ():  # never started
            os.close(fd)
        self._pipe = None

    def _set_capability(self, on: bool) -> None:
        try:
            self.qmp.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": CAPABILITY, "state": on}]})
        except QmpCommandError as exc:
            if on:
                raise QmpError(f"QEMU cannot stream the VM's state in the background: {exc.desc}",
                               hint="checkpoints need QEMU 6.0 or newer on a kernel with userfaultfd write "
                                    "protection (Linux 5.7+); a QEMU that runs unprivileged (libvirt's) also "
                                    "needs sysctl vm.unprivileged_userfaultfd=1") from None
            raise
        self._capability = on
