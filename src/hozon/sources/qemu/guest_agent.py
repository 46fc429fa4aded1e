"""The QEMU guest agent, and the freeze that makes an image backup application-consistent.

The agent (``qemu-ga``) runs inside the guest and serves JSON commands on a virtio-serial port.
On the host the other end of that port is a QEMU character device, here a unix socket::

    -chardev socket,id=qga0,path=SOCK,server=on,wait=off
    -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0

The protocol is QMP's without a greeting: one JSON object per command, answered in order by one
``{"return": …}`` or ``{"error": {"class": …, "desc": …}}``. The byte stream outlives a client:
what an earlier client left unread, or a reply that arrives after its command timed out, is
still in the pipe. So :class:`GuestAgent` resynchronises when it connects and after anything that
leaves the stream in doubt (a timeout, a malformed reply): it sends a 0xFF byte (the agent's
parser drops what it had half read) and ``guest-sync-delimited`` with a random id. The agent
writes a 0xFF byte before that reply; everything before it is stale, and so is a delimited reply
carrying another id (0xFF never occurs in JSON text). An agent too old for the delimited command
(before 1.1) is synchronised with ``guest-sync``: lines are skipped until ``{"return": id}``.

A guest whose agent is not running is silent: QEMU accepts the connection and what is written,
and nothing comes back. Every call therefore has a deadline, and a silent agent, a missing socket
or a broken stream is a :class:`~hozon.errors.GuestAgentError`; an error the agent reports for a
command is a :class:`~hozon.errors.GuestAgentCommandError`.

:class:`GuestQuiesce` is what an image backup puts around the QMP transaction that fixes its
instant (``PointInTime(..., quiesce=GuestQuiesce.through_agent(path))``): the guest's file
systems are frozen right before and always thawed right after, and it never raises — a guest
that cannot be frozen gives a crash-consistent backup and a note, not no backup. It uses any
:class:`GuestFreezer`; the socket agent is one, the agent of a libvirt domain reached through libvirt
(``hozon.sources.libvirt.agent``) is another.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Protocol

from hozon.errors import GuestAgentCommandError, GuestAgentError, HozonError

DEFAULT_TIMEOUT: Final = 5.0  # connecting with its synchronisation; each command but the freeze
FREEZE_TIMEOUT: Final = 10.0  # guest-fsfreeze-freeze: the agent syncs every file system first
THAW_TIMEOUT: Final = 10.0
DELIMITER: Final = b"\xff"
MAX_LINE: Final = 16 * 1024 * 1024  # far longer than any reply: a peer that is not an agent
_RECV_SIZE: Final = 64 * 1024
_SOCKET_HINT: Final = ("give QEMU -chardev socket,id=qga0,path=SOCKET,server=on,wait=off -device virtio-serial-pci "
                       "-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")


class GuestFreezer(Protocol):
    """What a backup needs to quiesce a guest: a connected agent, whatever carries it."""

    def freeze(self, timeout: float) -> int:
        """Freeze the guest's file systems; how many were frozen."""
        ...

    def thaw(self, timeout: float) -> int:
        """Thaw them; how many were thawed."""
        ...

    def close(self) -> None: ...


class GuestAgent:
    """One connection to a guest agent's unix socket. Open it with :meth:`connect`; a context manager.

    Not thread-safe. Implements :class:`GuestFreezer`.
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        if timeout <= 0:
            sock.close()
            raise ValueError("guest agent timeouts must be positive")
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = sock
        self._broken: str | None = None
        self._buffer = bytearray()
        self._in_sync = False
        self._where = f"the guest agent at {path}"

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> GuestAgent:
        """Connect to the agent's socket ``path`` and synchronise; ``timeout`` bounds both, and each later call."""
        where = os.fspath(path)
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
        except FileNotFoundError:
            sock.close()
            raise GuestAgentError(f"there is no guest agent socket at {where}", hint=_SOCKET_HINT) from None
        except ConnectionRefusedError:
            sock.close()
            raise GuestAgentError(f"the guest agent socket {where} refused the connection; is QEMU still running?",
                                  hint=_SOCKET_HINT) from None
        except OSError as exc:
            sock.close()
            raise GuestAgentError(f"cannot connect to the guest agent socket {where}: {_describe(exc)}") from None
        agent = cls(sock, where, timeout)
        try:
            agent._sync(deadline, timeout)
        except BaseException:
            agent.close()
            raise
        return agent

    def close(self) -> None:
        """Close the connection (the guest and its agent go on); safe to repeat."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """Drop whatever stale output the stream holds, so the next reply read is the next command's."""
        wait = self.timeout if timeout is None else timeout
        self._sync(time.monotonic() + wait, wait)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run ``command``; the agent's ``return`` value. ``timeout`` (default: the connection's) covers it all."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        if not self._in_sync:
            self._sync(deadline, wait)
        self._in_sync = False  # until its reply is read
        self._send(_encode(command, arguments), deadline, command)
        while True:
            line = self._line(deadline, f"the reply to {command}", wait)
            if line:
                break
        reply = _object(line)
        if reply is None:
            raise GuestAgentError(f"{self._where} answered {command} with something that is not JSON: "
                                  f"{_excerpt(line)}")
        self._in_sync = True
        if "return" in reply:
            return reply["return"]
        error = reply.get("error")
        if isinstance(error, dict):
            raise GuestAgentCommandError(command, str(error.get("class", "GenericError")),
                                         str(error.get("desc", "no description")).rstrip("."))
        raise GuestAgentError(f"{self._where} answered {command} with a message that is neither a return nor an "
                              f"error: {_excerpt(line)}")

    def ping(self, timeout: float | None = None) -> None:
        self.execute("guest-ping", timeout=timeout)

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> int:
        """``guest-fsfreeze-freeze``: how many file systems the agent froze.

        On an error the agent thaws what it had frozen itself; after a timeout nobody knows:
        call :meth:`thaw`.
        """
        return self._count("guest-fsfreeze-freeze", timeout)

    def thaw(self, timeout: float | None = None) -> int:
        """``guest-fsfreeze-thaw``: how many file systems the agent thawed."""
        return self._count("guest-fsfreeze-thaw", timeout)

    def status(self, timeout: float | None = None) -> str:
        """``guest-fsfreeze-status``: "thawed" or "frozen"."""
        answer = self.execute("guest-fsfreeze-status", timeout=timeout)
        if not isinstance(answer, str):
            raise GuestAgentError(f"{self._where} answered guest-fsfreeze-status with {_excerpt(answer)}, not a word")
        return answer

    def _count(self, command: str, timeout: float | None) -> int:
        answer = self.execute(command, timeout=timeout)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise GuestAgentError(f"{self._where} answered {command} with {_excerpt(answer)}, not a number")
        return answer

    # -- the stream ----------------------------------------------------------------------------

    def _sync(self, deadline: float, wait: float) -> None:
        self._in_sync = False
        ident = secrets.randbelow(2**31 - 1) + 1
        what = "the reply to guest-sync-delimited"
        self._send(DELIMITER + _encode("guest-sync-delimited", {"id": ident}), deadline, "guest-sync-delimited")
        after_delimiter = False
        while True:
            mark = self._buffer.find(DELIMITER)
            end = self._buffer.find(b"\n")
            if mark >= 0 and (end < 0 or mark < end):
                del self._buffer[: mark + 1]  # all before it is stale
                after_delimiter = True
                continue
            if end < 0:
                self._receive(deadline, what, wait)
                continue
            message = _object(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
            if message is not None and after_delimiter and message.get("return") == ident:
                self._in_sync = True
                return
            if message is not None and _unknown(message, "guest-sync-delimited"):
                self._plain_sync(deadline, wait)
                return
            after_delimiter = False  # a stale line, or a late delimited reply to an earlier sync

    def _plain_sync(self, deadline: float, wait: float) -> None:
        """``guest-sync`` for agents without the delimited variant: skip lines until our id comes back."""
        ident = secrets.randbelow(2**31 - 1) + 1
        self._send(_encode("guest-sync", {"id": ident}), deadline, "guest-sync")
        while True:
            message = _object(self._line(deadline, "the reply to guest-sync", wait).lstrip(DELIMITER))
            if message is not None and message.get("return") == ident:
                self._in_sync = True
                return

    def _usable(self) -> socket.socket:
        if self._sock is None:
            if self._broken is not None:
                raise GuestAgentError(f"the connection to {self._where} is gone: {self._broken}")
            raise GuestAgentError(f"the connection to {self._where} is closed")
        return self._sock

    def _fail(self, message: str) -> GuestAgentError:
        """The connection can no longer be used: close it, remember why, and make the error to raise."""
        if self._broken is None:
            self._broken = message
        self.close()
        return GuestAgentError(message)

    def _send(self, data: bytes, deadline: float, command: str) -> None:
        sock = self._usable()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestAgentError(f"no time was left to send {command} to {self._where}")
        try:
            sock.settimeout(remaining)
            sock.sendall(data)
        except TimeoutError:
            raise self._fail(f"{self._where} did not take the command {command} in time") from None
        except (BrokenPipeError, ConnectionResetError):
            raise self._fail(f"{self._where} closed the connection before Hozon could send {command}; "
                             "did QEMU quit?") from None
        except OSError as exc:
            raise self._fail(f"sending {command} to {self._where} failed: {_describe(exc)}") from None

    def _line(self, deadline: float, what: str, wait: float) -> bytes:
        """The next line, without its line break and surrounding white space."""
        while (end := self._buffer.find(b"\n")) < 0:
            self._receive(deadline, what, wait)
        line = bytes(self._buffer[:end]).strip()
        del self._buffer[: end + 1]
        return line

    def _receive(self, deadline: float, what: str, wait: float) -> None:
        if len(self._buffer) > MAX_LINE:
            self._buffer.clear()
            raise GuestAgentError(f"{self._where} sent more than {MAX_LINE} bytes without a line break; "
                                  "is it a guest agent?")
        sock = self._usable()
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise GuestAgentError(f"{self._where} did not send {what} within {wait:g} s",
                                  hint="is qemu-ga running in the guest?") from None
        except ConnectionResetError:
            data = b""
        except OSError as exc:
            raise self._fail(f"receiving {what} from {self._where} failed: {_describe(exc)}") from None
        if not data:
            raise self._fail(f"{self._where} closed the connection while Hozon waited for {what}; did QEMU quit?")
        self._buffer += data


class GuestQuiesce:
    """A context manager: the guest's file systems frozen inside the block, thawed when it is left.

    Entering opens the agent (``open_freezer()``) and freezes, within ``freeze_timeout``; leaving
    always thaws — also when the block raised, the freeze failed or timed out (the agent may still
    be at it) — and if the thaw fails it is tried once more on a new connection, then reported in
    :attr:`notes` and :attr:`warnings` (and as a note on the exception in flight, if any). Neither
    entering nor leaving raises over an agent's failure: the backup goes on, crash-consistent.

    After the block: :attr:`consistency` is "application" if the freeze succeeded, else "crash";
    :attr:`frozen_filesystems` is the agent's count; :attr:`frozen_seconds` runs from the freeze's
    answer to the thaw's (or to the last thaw attempt when none was confirmed).
    """

    def __init__(self, open_freezer: Callable[[], GuestFreezer], where: str, freeze_timeout: float = FREEZE_TIMEOUT,
                 thaw_timeout: float = THAW_TIMEOUT, thaw_hint: str = "guest-fsfreeze-thaw") -> None:
        if freeze_timeout <= 0 or thaw_timeout <= 0:
            raise ValueError("freeze and thaw timeouts must be positive")
        self.where = where
        self.thaw_hint = thaw_hint  # what an operator runs to thaw by hand, named in the warning
        self.freeze_timeout = freeze_timeout
        self.thaw_timeout = thaw_timeout
        self.consistency = "crash"
        self.frozen_filesystems = 0
        self.frozen_seconds = 0.0
        self.notes: list[str] = []
        self.warnings: list[str] = []  # the guest may be left frozen
        self._open = open_freezer
        self._freezer: GuestFreezer | None = None
        self._freeze_sent = False
        self._frozen_at: float | None = None
        self._entered = False

    @classmethod
    def through_agent(cls, path: str, freeze_timeout: float = FREEZE_TIMEOUT, thaw_timeout: float = THAW_TIMEOUT,
                      connect_timeout: float = DEFAULT_TIMEOUT) -> GuestQuiesce:
        """Freeze through the guest agent behind the unix socket ``path`` (connected on entering)."""
        return cls(lambda: GuestAgent.connect(path, connect_timeout), f"the guest agent at {path}",
                   freeze_timeout, thaw_timeout)

    def __enter__(self) -> GuestQuiesce:
        if self._entered:
            raise RuntimeError("a GuestQuiesce can be entered only once")
        self._entered = True
        try:
            self._freeze()
        except BaseException as exc:  # interrupted while freezing: thaw all the same
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _freeze(self) -> None:
        try:
            self._freezer = self._open()
        except HozonError as exc:
            self.notes.append(f"the guest's file systems were not frozen: {exc.message}; the backup is "
                              "crash-consistent")
            return
        self._freeze_sent = True
        try:
            count = self._freezer.freeze(self.freeze_timeout)
        except HozonError as exc:
            self.notes.append(f"the guest's file systems were not frozen: {exc.message}; the backup is "
                              "crash-consistent")
            return
        self._frozen_at = time.monotonic()
        self.consistency = "application"
        self.frozen_filesystems = count
        if count == 0:
            self.notes.append(f"{self.where} answered the freeze but froze no file system (the guest may have "
                              "none that can be frozen)")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        freezer, self._freezer = self._freezer, None
        if freezer is None:
            return
        if not self._freeze_sent:
            _close(freezer)
            return
        failure = self._thaw(freezer)
        if self._frozen_at is not None:
            self.frozen_seconds = time.monotonic() - self._frozen_at
        if failure is not None:
            warning = (f"WARNING: {self.where} did not confirm the thaw ({failure}): file systems in the guest "
                       f"may still be frozen: run {self.thaw_hint}")
            self.notes.append(warning)
            self.warnings.append(warning)
            if exc is not None:
                exc.add_note(warning)

    def _thaw(self, freezer: GuestFreezer) -> str | None:
        """Thaw, then once more on a new connection if that failed; why it failed (None: thawed)."""
        try:
            freezer.thaw(self.thaw_timeout)
            return None
        except HozonError as error:
            first = error.message
        finally:
            _close(freezer)
        try:
            again = self._open()
        except HozonError as error:
            return f"{first}; then: {error.message}"
        try:
            again.thaw(self.thaw_timeout)
            return None
        except HozonError as error:
            return f"{first}; then: {error.message}"
        finally:
            _close(again)


def _close(freezer: GuestFreezer) -> None:
    with contextlib.suppress(HozonError, OSError):
        freezer.close()


def _encode(command: str, arguments: Mapping[str, Any] | None) -> bytes:
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = dict(arguments)
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _object(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None if it holds none (stale, partial or garbage)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _unknown(message: dict[str, Any], command: str) -> bool:
    """The agent says it has no ``command``."""
    error = message.get("error")
    return (isinstance(error, dict) and error.get("class") == "CommandNotFound"
            and command in str(error.get("desc", "")))


def _excerpt(value: object, limit: int = 120) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else json.dumps(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__
