"""A synchronous client for QEMU's machine protocol (QMP) over a unix socket.

QMP is line-delimited JSON: QEMU greets a new client with ``{"QMP": {"version": …}}``, the client
answers ``qmp_capabilities``, and from then on each ``{"execute": …, "id": …}`` gets one
``{"return": …}`` or ``{"error": {"class": …, "desc": …}}`` carrying the same id. Asynchronous
events (``{"event": …, "data": …, "timestamp": …}``) may arrive at any moment, also between a
command and its reply; the client keeps them in a queue for :meth:`QmpClient.events` and
:meth:`QmpClient.wait_event`, so none is lost while a command runs.

Every socket operation has a deadline. A QMP socket serves one client at a time: a second client's
connection is accepted by the kernel but QEMU says nothing to it, so a greeting that does not come
is reported as "is another client connected?" rather than waited for forever. A QEMU that quits
(or is killed) shows up as a :class:`QmpError` naming the command that was waiting. Each line is
parsed on its own, so the monitor must use QMP's default compact output (``pretty=off``).

Not thread-safe: use one client per thread. Replies are matched to commands by id, so a reply that
arrives after its command timed out is recognised and dropped, and the connection stays usable.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NamedTuple

from hozon.errors import QmpCommandError, QmpError

DEFAULT_TIMEOUT: Final = 10.0  # connecting, the greeting and capability negotiation
DEFAULT_COMMAND_TIMEOUT: Final = 60.0  # one command, from sending it to its reply
MAX_LINE: Final = 64 * 1024 * 1024  # longer than any real QMP message: a peer that is not QMP
MAX_QUEUED_EVENTS: Final = 10_000  # past this, the oldest queued events are dropped
_RECV_SIZE: Final = 256 * 1024


class QemuVersion(NamedTuple):
    """QEMU's version from the greeting; compares as a tuple: ``client.version >= (8, 2)``."""

    major: int
    minor: int
    micro: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@dataclass(frozen=True)
class QmpEvent:
    """One asynchronous event; ``timestamp`` is QEMU's clock in seconds since the epoch."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    def matches(self, name: str | None, match: Mapping[str, Any] | None = None) -> bool:
        """True if the name is ``name`` (None: any) and ``data`` holds every item of ``match``.

        Nested mappings in ``match`` are compared the same way, so ``{"a": {"b": 1}}`` matches
        ``{"a": {"b": 1, "c": 2}}``.
        """
        return (name is None or self.name == name) and (match is None or _contains(self.data, match))


def _contains(data: Any, match: Mapping[str, Any]) -> bool:
    if not isinstance(data, dict):
        return False
    for key, want in match.items():
        if key not in data:
            return False
        if isinstance(want, Mapping):
            if not _contains(data[key], want):
                return False
        elif data[key] != want:
            return False
    return True


class QmpClient:
    """One QMP session with one QEMU process. Open it with :meth:`connect`; use as a context manager."""

    def __init__(self, sock: socket.socket, path: str, timeout: float, command_timeout: float) -> None:
        if timeout <= 0 or command_timeout <= 0:
            sock.close()
            raise ValueError("QMP timeouts must be positive")
        self.path = path
        self.timeout = timeout
        self.command_timeout = command_timeout
        self.version = QemuVersion(0, 0, 0)
        self.package = ""  # Debian's QEMU says e.g. "Debian 1:7.2+dfsg-7+deb12u18"
        self.capabilities: tuple[str, ...] = ()  # offered in the greeting (none are enabled)
        self._sock: socket.socket | None = sock
        self._broken: str | None = None
        self._buffer = bytearray()
        self._events: deque[QmpEvent] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._next_id = 0
        self._where = f"QEMU's monitor at {path}"

    # -- opening and closing -------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> QmpClient:
        """Connect to the QMP unix socket ``path``, read the greeting and leave capability negotiation.

        ``timeout`` bounds connecting, the greeting and ``qmp_capabilities`` together;
        ``command_timeout`` is the default for each later :meth:`execute`.
        """
        where = os.fspath(path)
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
        except FileNotFoundError:
            sock.close()
            raise QmpError(f"there is no QEMU monitor socket at {where}",
                           hint="start QEMU with -qmp unix:PATH,server=on,wait=off") from None
        except ConnectionRefusedError:
            sock.close()
            raise QmpError(f"QEMU's monitor at {where} refused the connection; is QEMU still running?") from None
        except OSError as exc:
            sock.close()
            raise QmpError(f"cannot connect to QEMU's monitor at {where}: {_describe(exc)}") from None
        client = cls(sock, where, timeout, command_timeout)
        try:
            client._handshake(deadline)
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the connection (QEMU keeps running); safe to repeat."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------------

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float | None = None, fds: Sequence[int] = ()) -> Any:
        """Run ``command`` and return QEMU's ``return`` value; QEMU's error raises :class:`QmpCommandError`.

        Events that arrive meanwhile are queued. ``timeout`` defaults to ``command_timeout``.
        ``fds`` travel with the command (SCM_RIGHTS), as ``getfd`` wants them.
        """
        wait = self.command_timeout if timeout is None else timeout
        return self._execute(command, arguments, time.monotonic() + wait, wait, fds)

    def pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a copy of the descriptor ``fd`` under ``name`` (``getfd``), e.g. for ``migrate fd:NAME``."""
        self.execute("getfd", {"fdname": name}, fds=[fd])

    def transaction(self, actions: Sequence[Mapping[str, Any]], properties: Mapping[str, Any] | None = None,
                    timeout: float | None = None) -> None:
        """Run ``actions`` (each ``{"type": …, "data": {…}}``) as one QMP ``transaction``: all or none."""
        arguments: dict[str, Any] = {"actions": [dict(a) for a in actions]}
        if properties:
            arguments["properties"] = dict(properties)
        self.execute("transaction", arguments, timeout)

    def hmp(self, command: str, timeout: float | None = None) -> str:
        """Run a human monitor command through ``human-monitor-command`` and return its output.

        HMP reports most failures as text in the output, not as a QMP error: check what it says.
        """
        output = self.execute("human-monitor-command", {"command-line": command}, timeout)
        if not isinstance(output, str):
            raise self._fail(f"{self._where} answered the HMP command {command!r} with {type(output).__name__}, "
                             "not text")
        return output

    # -- events --------------------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[QmpEvent]:
        """Take every queued event named ``name`` (None: all), oldest first, without waiting.

        Events already sent by QEMU but not yet read are read first. Works after QEMU has gone,
        so its last events (``SHUTDOWN``) can still be seen.
        """
        if self._sock is not None:
            with contextlib.suppress(QmpError):  # a closed connection is reported by the next command
                while (message := self._next_message(None, "events")) is not None:
                    if "event" in message:
                        self._events.append(_event(message))
                    # else: the late reply to a command that timed out earlier
        taken = [e for e in self._events if e.matches(name)]
        if taken:
            self._events = deque((e for e in self._events if not e.matches(name)), maxlen=MAX_QUEUED_EVENTS)
        return taken

    def wait_event(self, name: str, timeout: float | None = None,
                   match: Mapping[str, Any] | None = None) -> QmpEvent:
        """Take the first event named ``name`` whose data holds ``match`` (see :meth:`QmpEvent.matches`).

        Queued events are looked at first; others stay queued. ``timeout`` defaults to
        ``command_timeout``; when it passes, :class:`QmpError` is raised and the session stays usable.
        """
        wait = self.command_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        what = f"a {name} event" + (f" with {json.dumps(match, sort_keys=True)}" if match else "")
        for event in self._events:
            if event.matches(name, match):
                self._events.remove(event)
                return event
        self._usable()
        while True:
            message = self._next_message(deadline, what, wait)
            if message is None or "event" not in message:
                continue  # the late reply to a command that timed out earlier
            event = _event(message)
            if event.matches(name, match):
                return event
            self._events.append(event)

    # -- the session ---------------------------------------------------------------------------

    def _handshake(self, deadline: float) -> None:
        greeting = self._next_message(deadline, "its greeting", self.timeout, greeting=True)
        qmp = greeting.get("QMP") if greeting is not None else None
        if not isinstance(qmp, dict):
            raise self._fail(f"{self._where} did not greet like a QMP monitor: {_excerpt(greeting)}")
        try:
            version = qmp["version"]["qemu"]
            self.version = QemuVersion(int(version["major"]), int(version["minor"]), int(version["micro"]))
            self.package = str(qmp["version"].get("package", "")).strip()
        except (KeyError, TypeError, ValueError):
            raise self._fail(f"{self._where} greeted without a QEMU version: {_excerpt(greeting)}") from None
        offered = qmp.get("capabilities", [])
        self.capabilities = tuple(str(c) for c in offered) if isinstance(offered, list) else ()
        self._execute("qmp_capabilities", None, deadline, self.timeout)

    def _execute(self, command: str, arguments: Mapping[str, Any] | None, deadline: float, wait: float,
                 fds: Sequence[int] = ()) -> Any:
        self._usable()
        self._next_id += 1
        ident = self._next_id
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments is not None:
            message["arguments"] = dict(arguments)
        try:
            data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise QmpError(f"the arguments of QMP command {command} cannot be sent as JSON: {exc}") from None
        self._send(data, deadline, command, fds)
        what = f"the reply to {command}"
        while True:
            reply = self._next_message(deadline, what, wait)
            if reply is None:  # not reached: only polling returns None
                continue
            if "event" in reply:
                self._events.append(_event(reply))
                continue
            if "id" in reply and reply["id"] != ident:
                continue  # the late reply to a command that timed out earlier
            if "return" in reply:
                return reply["return"]
            error = reply.get("error")
            if isinstance(error, dict):
                raise QmpCommandError(command, str(error.get("class", "GenericError")),
                                      str(error.get("desc", "no description")).rstrip("."))
            raise self._fail(f"{self._where} answered {command} with a message that is neither a return nor an "
                             f"error: {_excerpt(reply)}")

    def _usable(self) -> None:
        if self._sock is None:
            if self._broken is not None:
                raise QmpError(f"the connection to {self._where} is gone: {self._broken}")
            raise QmpError(f"the connection to {self._where} is closed")

    def _fail(self, message: str, hint: str | None = None) -> QmpError:
        """The stream can no longer be trusted: close it, remember why, and make the error to raise."""
        if self._broken is None:
            self._broken = message
        self.close()
        return QmpError(message, hint=hint)

    def _send(self, data: bytes, deadline: float, command: str, fds: Sequence[int] = ()) -> None:
        sock = self._socket()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QmpError(f"no time was left to send {command} to {self._where}")
        try:
            sock.settimeout(remaining)
            if fds:  # the descriptors go with the first byte; the rest follows as usual
                sent = socket.send_fds(sock, [data[:1]], list(fds))
                data = data[sent:]
            sock.sendall(data)
        except TimeoutError:
            raise self._fail(f"{self._where} did not take the command {command} in time") from None
        except (BrokenPipeError, ConnectionResetError):
            raise self._fail(f"{self._where} closed the connection before Hozon could send {command}; "
                             "did QEMU quit?") from None
        except OSError as exc:
            raise self._fail(f"sending {command} to {self._where} failed: {_describe(exc)}") from None

    def _socket(self) -> socket.socket:
        self._usable()
        assert self._sock is not None
        return self._sock

    def _next_message(self, deadline: float | None, what: str, wait: float = 0.0,
                      greeting: bool = False) -> dict[str, Any] | None:
        """The next message, an event or a reply; ``deadline=None`` polls and may return None.

        ``what`` names what is awaited and ``wait`` the whole wait, for error messages.
        """
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise self._fail(f"{self._where} sent more than {MAX_LINE} bytes without a line break; "
                                     "it does not speak QMP")
                if not self._receive(deadline, what, wait, greeting):
                    return None
                continue
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if not line:
                continue
            message = self._parse(line, greeting)
            if greeting or "return" in message or "error" in message:
                return message
            if "event" in message:
                if not isinstance(message["event"], str):
                    raise self._fail(f"{self._where} sent an event without a name: {_excerpt(message)}")
                return message
            raise self._fail(f"{self._where} sent a message that is not QMP: {_excerpt(message)}")

    def _parse(self, line: bytes, greeting: bool) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict):
            return message
        if greeting:
            raise self._fail(f"{self._where} did not greet like a QMP monitor: {_excerpt(line)}",
                             hint="is it an HMP monitor (-monitor)? Hozon needs a -qmp socket")
        raise self._fail(f"{self._where} sent a malformed message: {_excerpt(line)}",
                         hint="Hozon needs the monitor's default compact JSON (no pretty=on)")

    def _receive(self, deadline: float | None, what: str, wait: float, greeting: bool) -> bool:
        """Append what the socket has to the buffer; False if polling found nothing."""
        sock = self._socket()
        try:
            if deadline is None:
                sock.setblocking(False)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            if deadline is None:
                return False
            raise self._timeout(what, wait, greeting) from None
        except TimeoutError:
            if deadline is None:
                return False
            raise self._timeout(what, wait, greeting) from None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise self._fail(f"receiving {what} from {self._where} failed: {_describe(exc)}") from None
        if not data:
            partial = " in the middle of a message" if self._buffer else ""
            raise self._fail(f"{self._where} closed the connection{partial} while Hozon waited for {what}; "
                             "did QEMU quit?")
        self._buffer += data
        return True

    def _timeout(self, what: str, wait: float, greeting: bool) -> QmpError:
        if greeting:  # a connected client that hears nothing: QEMU is serving someone else
            return self._fail(f"{self._where} did not answer within {wait:g} s; is another client connected to it?",
                              hint="a QMP socket serves one client at a time: give QEMU a second -qmp socket "
                                   "for Hozon")
        return QmpError(f"{self._where} did not send {what} within {wait:g} s")


def _event(message: dict[str, Any]) -> QmpEvent:
    data = message.get("data")
    stamp = message.get("timestamp")
    seconds = 0.0
    if isinstance(stamp, dict):
        with contextlib.suppress(TypeError, ValueError):
            seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    return QmpEvent(str(message["event"]), data if isinstance(data, dict) else {}, seconds)


def _excerpt(value: object, limit: int = 120) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__
