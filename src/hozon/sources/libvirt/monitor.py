"""QEMU's monitor of a libvirt domain, reached through libvirt: a :class:`QmpClient` for fleecing.

libvirt owns the QMP socket of the QEMU it runs, so Hozon cannot connect to it; it passes each
command through libvirt (``virsh qemu-monitor-command DOMAIN '{"execute": …}'``, the API
``virDomainQemuMonitorCommand``) and gets QEMU's reply back unchanged. Events come from a
``virsh qemu-monitor-event --loop`` child that libvirt feeds with every event QEMU sends. So
:class:`LibvirtMonitor` answers exactly like a :class:`QmpClient`, and the fleecing, the dirty
bitmaps and the cleanup (``hozon.sources.qemu``) run unchanged.

What differs from a QMP socket:

- libvirt *taints* a domain whose monitor was used this way ("custom monitor control commands
  issued", in ``virsh dominfo`` and the domain's log) until it is restarted; it still runs and
  migrates as before. Hozon's nodes, jobs, exports and bitmaps are its own (``hozon-…``), which
  libvirt leaves alone.
- QEMU runs as another user (Debian: libvirt-qemu) and must create the NBD socket and open the
  scratch images itself. libvirt hands a file to QEMU by changing its owner (its DAC driver) before
  QEMU opens it; commands passed through are not seen by that driver, so the monitor does it:
  :meth:`LibvirtMonitor.share_directory` gives a directory to QEMU's user, and a ``blockdev-add``
  that opens a file inside such a directory gives QEMU that file first. Nothing else is touched.
- Events are seen from the moment the listener has registered with libvirt, a few milliseconds
  after :meth:`LibvirtMonitor.connect`; the commands Hozon sends first raise none.
- A command costs a virsh process (20–30 ms); a backup sends a few dozen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from hozon.errors import HozonError, QmpCommandError, QmpError
from hozon.sources.libvirt.domain import DomainInfo, describe
from hozon.sources.libvirt.virsh import Virsh, VirshFailed
from hozon.sources.qemu.qmp import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_TIMEOUT,
    MAX_QUEUED_EVENTS,
    QemuVersion,
    QmpClient,
    QmpEvent,
)

_EVENT_LINE: Final = re.compile(r"event (?P<name>\S+) at (?P<seconds>\d+)\.(?P<micros>\d+) for domain '")
_MAX_EVENT_LINE: Final = 16 * 1024 * 1024
# virsh qemu-monitor-event --loop runs until killed. A shell runs it and stops it when its own stdin,
# a pipe from Hozon, closes: on close(), and also when Hozon dies, so no listener outlives Hozon.
_LISTENER: Final = '"$@" & listener=$!; read -r _; kill "$listener" 2>/dev/null; wait "$listener"'


class LibvirtMonitor(QmpClient):
    """The QMP monitor of one running libvirt domain, through libvirt; use as a context manager.

    Open it with :meth:`connect`. It has every method of :class:`QmpClient` and behaves the same;
    :attr:`domain` describes the domain as it was when the monitor was opened.
    """

    # No QmpClient.__init__: there is no socket of Hozon's. Every method that would use one is
    # overridden here; transaction() and hmp() are QmpClient's own, built on execute().
    def __init__(self, virsh: Virsh, domain: DomainInfo, timeout: float, command_timeout: float) -> None:
        if timeout <= 0 or command_timeout <= 0:
            raise ValueError("monitor timeouts must be positive")
        self.virsh = virsh
        self.domain = domain
        self.path = f"libvirt:{domain.name}"
        self.timeout = timeout
        self.command_timeout = command_timeout
        self.version = QemuVersion(0, 0, 0)
        self.package = ""
        self.capabilities: tuple[str, ...] = ()
        self._broken: str | None = None
        self._closed = False
        self._where = f"QEMU's monitor of libvirt domain {domain.name}"
        self._events: deque[QmpEvent] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._listener: subprocess.Popen[bytes] | None = None
        self._pending = bytearray()  # the listener's output not yet split into lines
        self._shared: list[Path] = []

    # -- opening and closing -------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        uri: str | None = None,
    ) -> LibvirtMonitor:
        """The monitor of the running domain ``path`` (its name, id or UUID) on libvirt ``uri``.

        ``uri`` None is virsh's default (``LIBVIRT_DEFAULT_URI``, else qemu:///system for root).
        """
        domain = os.fspath(path)
        virsh = Virsh(uri)
        info = describe(virsh, domain)
        if not info.running:
            raise QmpError(f"libvirt domain {info.name} is not running",
                           hint="start it, or back up the images of a shut-off VM with --image FILE … --name NAME")
        monitor = cls(virsh, info, timeout, command_timeout)
        try:
            monitor._listen()
            answer = monitor.execute("query-version", timeout=timeout)
            qemu = answer.get("qemu", {}) if isinstance(answer, dict) else {}
            try:
                monitor.version = QemuVersion(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
            except (KeyError, TypeError, ValueError):
                raise monitor._fail(f"{monitor._where} answered query-version without a version") from None
            monitor.package = str(answer.get("package", "")).strip()
        except BaseException:
            monitor.close()
            raise
        return monitor

    def close(self) -> None:
        """Stop listening for events (the domain keeps running); safe to repeat."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            if listener.stdin is not None:
                listener.stdin.close()  # the wrapper's cue to stop virsh (see _LISTENER)
            try:
                listener.wait(5)
            except subprocess.TimeoutExpired:
                listener.kill()
                listener.wait()
            if listener.stdout is not None:
                listener.stdout.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LibvirtMonitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------------

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float | None = None, fds: Sequence[int] = ()) -> Any:
        """Run ``command`` through libvirt and return QEMU's ``return`` value, like :meth:`QmpClient.execute`.

        ``fds`` go along through libvirt (``qemu-monitor-command --pass-fds``)."""
        self._usable()
        wait = self.command_timeout if timeout is None else timeout
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        try:
            text = json.dumps(message, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise QmpError(f"the arguments of QMP command {command} cannot be sent as JSON: {exc}") from None
        if command == "blockdev-add" and arguments is not None:
            self._hand_over_files(arguments)
        try:
            passing = ["--pass-fds", ",".join(map(str, fds))] if fds else []
            output = self.virsh.run(["qemu-monitor-command", *passing, "--", self.domain.uuid, text],
                                    f"pass {command} to QEMU", timeout=wait, pass_fds=fds)
        except subprocess.TimeoutExpired:
            raise QmpError(f"{self._where} did not send the reply to {command} within {wait:g} s") from None
        except VirshFailed as exc:
            if exc.unreachable or exc.no_domain or exc.not_running or not self._domain_alive():
                raise self._fail(f"{self._where} is gone while Hozon waited for the reply to {command}: "
                                 f"{exc.detail}", hint=exc.hint) from None
            raise QmpError(f"libvirt did not pass {command} to QEMU: {exc.detail}") from None
        try:
            reply = json.loads(output)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise QmpError(f"{self._where} answered {command} with something that is not QMP: "
                           f"{output.strip()[:120]!r}")
        if "return" in reply:
            return reply["return"]
        error = reply.get("error")
        if isinstance(error, dict):
            raise QmpCommandError(command, str(error.get("class", "GenericError")),
                                  str(error.get("desc", "no description")).rstrip("."))
        raise QmpError(f"{self._where} answered {command} with a message that is neither a return nor an "
                       f"error: {output.strip()[:120]!r}")

    # -- events --------------------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[QmpEvent]:
        """Take every queued event named ``name`` (None: all), oldest first, without waiting."""
        self._read_events(0.0)
        taken = [e for e in self._events if e.matches(name)]
        if taken:
            self._events = deque((e for e in self._events if not e.matches(name)), maxlen=MAX_QUEUED_EVENTS)
        return taken

    def wait_event(self, name: str, timeout: float | None = None,
                   match: Mapping[str, Any] | None = None) -> QmpEvent:
        """Take the first event named ``name`` whose data holds ``match``, like :meth:`QmpClient.wait_event`."""
        wait = self.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        self._usable()
        while True:
            for event in self._events:
                if event.matches(name, match):
                    self._events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                what = f"a {name} event" + (f" with {json.dumps(match, sort_keys=True)}" if match else "")
                raise QmpError(f"{self._where} did not send {what} within {wait:g} s")
            self._read_events(remaining)

    # -- handing files to QEMU -----------------------------------------------------------------

    def share_directory(self, path: Path) -> None:
        """Let QEMU create files in ``path`` and open the files Hozon makes there (see the module doc)."""
        owner = self.domain.qemu_owner
        path = Path(path).absolute()
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            try:
                os.chown(path, *owner)
            except PermissionError:
                raise HozonError(f"libvirt runs QEMU as user {owner[0]}, which must be given the scratch "
                                 f"directory {path}; only root can do that",
                                 hint="run hozon as root for a domain of qemu:///system") from None
            except OSError as exc:
                raise HozonError(f"cannot give the scratch directory {path} to QEMU: {exc.strerror or exc}") from None
        self._shared.append(path)

    def _hand_over_files(self, arguments: Mapping[str, Any]) -> None:
        owner = self.domain.qemu_owner
        if owner is None or not self._shared or owner == (os.geteuid(), os.getegid()):
            return
        for filename in _file_names(arguments):
            path = Path(filename).absolute()
            if path.parent in self._shared and path.is_file() and not path.is_symlink():
                try:
                    os.chown(path, *owner)
                except OSError as exc:
                    raise HozonError(f"cannot give {path} to QEMU: {exc.strerror or exc}") from None

    # -- the event listener --------------------------------------------------------------------

    def _listen(self) -> None:
        args = self.virsh.command("qemu-monitor-event", "--domain", self.domain.uuid, "--loop")
        self._listener = subprocess.Popen(["sh", "-c", _LISTENER, "hozon-events", *args], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.virsh.env)
        assert self._listener.stdout is not None
        os.set_blocking(self._listener.stdout.fileno(), False)

    def _read_events(self, wait: float) -> None:
        """Queue what the listener printed, waiting up to ``wait`` seconds for something to come."""
        listener = self._listener
        if listener is None or listener.stdout is None:
            if wait > 0:
                time.sleep(wait)  # no events come any more: wait as if none came
            return
        fd = listener.stdout.fileno()
        deadline = time.monotonic() + wait
        while True:
            try:
                data = os.read(fd, 256 * 1024)
            except BlockingIOError:
                data = None
            if data == b"":  # the listener ended (killed from outside): nothing more comes
                self._listener = None
                for pipe in (listener.stdin, listener.stdout):
                    if pipe is not None:
                        pipe.close()
                listener.wait()
                self._queue_lines(final=True)
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    time.sleep(remaining)
                return
            if data:
                self._pending += data
                if self._queue_lines() and wait > 0:
                    return  # something came: let the caller look
                continue  # read on while data is there
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([fd], [], [], remaining)

    def _queue_lines(self, final: bool = False) -> int:
        added = 0
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                if final and self._pending:
                    end = len(self._pending)
                else:
                    if len(self._pending) > _MAX_EVENT_LINE:
                        del self._pending[:]
                    return added
            line = bytes(self._pending[:end]).decode("utf-8", "replace").strip()
            del self._pending[: end + 1]
            event = _parse_event(line, self.domain.name)
            if event is not None:
                self._events.append(event)
                added += 1

    # -- the session ---------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._closed:
            if self._broken is not None:
                raise QmpError(f"the connection to {self._where} is gone: {self._broken}")
            raise QmpError(f"the connection to {self._where} is closed")

    def _domain_alive(self) -> bool:
        """Whether the domain's QEMU still runs (asked when libvirt failed to pass a command)."""
        try:
            state = self.virsh.run(["domstate", "--", self.domain.uuid], "give the domain's state", timeout=10)
        except (VirshFailed, subprocess.TimeoutExpired):
            return False
        return state.strip() in ("running", "paused", "in shutdown", "blocked", "pmsuspended")

    def _fail(self, message: str, hint: str | None = None) -> QmpError:
        if self._broken is None:
            self._broken = message
        self.close()
        return QmpError(message, hint=hint)


def _parse_event(line: str, domain: str) -> QmpEvent | None:
    """One line of ``virsh qemu-monitor-event``: ``event NAME at S.US for domain 'D': DATA``."""
    head = _EVENT_LINE.match(line)
    if head is None:
        return None
    rest = line[head.end():]
    known = f"{domain}': "
    data_text = rest[len(known):] if rest.startswith(known) else rest.partition("': ")[2]
    data: Any = {}
    if data_text and data_text != "<null>":
        with contextlib.suppress(ValueError):
            data = json.loads(data_text)
    seconds = int(head["seconds"]) + int(head["micros"]) / 1e6
    return QmpEvent(head["name"], data if isinstance(data, dict) else {}, seconds)


def _file_names(value: Any) -> list[str]:
    """Every ``filename`` of a ``"driver": "file"`` node in a ``blockdev-add``'s arguments."""
    found: list[str] = []
    if isinstance(value, Mapping):
        if value.get("driver") == "file" and isinstance(value.get("filename"), str):
            found.append(value["filename"])
        for item in value.values():
            found += _file_names(item)
    elif isinstance(value, list):
        for item in value:
            found += _file_names(item)
    return found
