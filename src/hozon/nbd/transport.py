"""The client's socket: every send and receive has a timeout, and every failure is an NbdError.

Where the kernel takes SO_RCVTIMEO / SO_SNDTIMEO (Linux does), the socket is blocking with kernel
timeouts, so a receive waits for all of its bytes in one system call (MSG_WAITALL) and a read's
data lands straight in a new bytes object, never copied. Elsewhere Python's own per-call timeout
is used. Once anything goes wrong mid-stream the transport is *broken*: it closes, and every later
use raises, because the byte stream can no longer be trusted.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from hozon.errors import NbdError


class Transport:
    def __init__(self, sock: socket.socket, timeout: float, address: str = "") -> None:
        if timeout <= 0:
            sock.close()
            raise ValueError("the NBD timeout must be positive")
        self.sock: socket.socket | None = sock
        self.timeout = timeout
        self.address = address
        self.where = f"NBD server at {address}" if address else "NBD server"  # starts error messages
        self.broken: str | None = None
        self._recv_flags = _set_timeouts(sock, timeout)

    @property
    def closed(self) -> bool:
        return self.sock is None

    def usable(self) -> None:
        """Raise unless requests can still be sent."""
        if self.broken is not None:
            raise NbdError(f"the connection to the {self.where} failed earlier: {self.broken}")
        if self.sock is None:
            raise NbdError(f"the connection to the {self.where} is closed")

    def fail(self, message: str) -> NbdError:
        """Mark the stream as out of step, close it, and make the error to raise."""
        if self.broken is None:
            self.broken = message
        self.close()
        return NbdError(message)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise NbdError(f"the connection to the {self.where} is closed")
        return self.sock

    def send(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._socket()
        try:
            sock.sendall(data)
        except (TimeoutError, BlockingIOError):
            raise self.fail(f"{self.where} did not take a request for {self.timeout:g} s") from None
        except OSError as exc:
            raise self.fail(f"sending to the {self.where} failed: {describe_os_error(exc)}") from None

    def recv_into(self, view: memoryview, first: bool = False) -> None:
        """Fill ``view``; ``first`` means a clean close before any byte is not mid-message."""
        sock = self._socket()
        want = len(view)
        got = 0
        try:
            while got < want:
                n = sock.recv_into(view[got:] if got else view, 0, self._recv_flags)
                if n == 0:
                    raise self._closed_by_peer(first and got == 0)
                got += n
        except (TimeoutError, BlockingIOError):
            raise self.fail(f"{self.where} sent nothing for {self.timeout:g} s") from None
        except OSError as exc:
            raise self.fail(f"receiving from the {self.where} failed: {describe_os_error(exc)}") from None

    def recv_bytes(self, length: int, first: bool = False) -> bytes:
        """Exactly ``length`` bytes, received into a new bytes object whenever possible."""
        sock = self._socket()
        try:
            data = sock.recv(length, self._recv_flags)
        except (TimeoutError, BlockingIOError):
            raise self.fail(f"{self.where} sent nothing for {self.timeout:g} s") from None
        except OSError as exc:
            raise self.fail(f"receiving from the {self.where} failed: {describe_os_error(exc)}") from None
        if len(data) == length:
            return data
        if not data:
            raise self._closed_by_peer(first)
        buffer = bytearray(length)  # a short receive (a signal, a close, a timeout): finish by hand
        buffer[: len(data)] = data
        self.recv_into(memoryview(buffer)[len(data) :])
        return bytes(buffer)

    def _closed_by_peer(self, between_messages: bool) -> NbdError:
        where = "" if between_messages else " in the middle of a message"
        return self.fail(f"{self.where} closed the connection{where}")


def _set_timeouts(sock: socket.socket, timeout: float) -> int:
    """Give every send and receive on ``sock`` a ``timeout``; returns the flags to receive with."""
    seconds = int(timeout)
    timeval = struct.pack("@ll", seconds, int((timeout - seconds) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        sock.settimeout(timeout)
        return 0
    sock.settimeout(None)
    return socket.MSG_WAITALL


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__
