"""A scripted fake NBD server for the client's unit tests.

The fixture ``fake_nbd`` starts a script in a thread on one end of a socketpair and gives the test
a connected client socket; the script drives a :class:`Peer`, which speaks just enough of the
server's side of the protocol to hand the client good replies, odd but legal ones, or broken ones.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from hozon.nbd import protocol as p


class PeerClosed(Exception):
    """The client went away; a script simply stops."""


@dataclass
class Request:
    flags: int
    kind: int
    handle: int
    offset: int
    length: int


@dataclass
class Peer:
    sock: socket.socket
    stop: threading.Event
    requests: list[Request] = field(default_factory=list)
    options: list[int] = field(default_factory=list)
    contexts: dict[str, int] = field(default_factory=dict)

    # -- raw I/O ---------------------------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                part = self.sock.recv(n - len(data))
            except OSError as exc:
                raise PeerClosed from exc
            if not part:
                raise PeerClosed
            data += part
        return data

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise PeerClosed from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def stall(self) -> None:
        """Say nothing more until the test is over."""
        self.stop.wait(60)

    # -- handshake -------------------------------------------------------------------------------

    def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.send(p.encode_option_reply(option, reply, data))

    def handshake(
        self,
        size: int = 1 << 20,
        *,
        structured: bool = True,
        contexts: tuple[str, ...] = ("base:allocation",),
        block_size: tuple[int, int, int] | None = None,
        go: bool = True,
        exports: tuple[str, ...] = ("",),
        tflags: int = p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY,
        hflags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES,
    ) -> None:
        """The server's side of fixed newstyle negotiation, up to the transmission phase."""
        self.send(p.HANDSHAKE_HEAD.pack(p.NBDMAGIC, p.IHAVEOPT, hflags))
        (cflags,) = struct.unpack(">I", self.recv(4))
        no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEAD.unpack(self.recv(p.OPTION_HEAD.size))
            assert magic == p.IHAVEOPT
            data = self.recv(length)
            self.options.append(option)
            if option == p.OPT_STRUCTURED_REPLY:
                self.option_reply(option, p.REP_ACK if structured else p.REP_ERR_UNSUP)
            elif option == p.OPT_SET_META_CONTEXT:
                (name_len,) = struct.unpack_from(">I", data)
                pos = 4 + name_len
                (count,) = struct.unpack_from(">I", data, pos)
                pos += 4
                for _ in range(count):
                    (qlen,) = struct.unpack_from(">I", data, pos)
                    query = data[pos + 4 : pos + 4 + qlen].decode()
                    pos += 4 + qlen
                    if query in contexts:
                        context_id = contexts.index(query) + 1
                        self.contexts[query] = context_id
                        self.option_reply(option, p.REP_META_CONTEXT, struct.pack(">I", context_id) + query.encode())
                self.option_reply(option, p.REP_ACK)
            elif option == p.OPT_GO and go:
                (name_len,) = struct.unpack_from(">I", data)
                name = data[4 : 4 + name_len].decode()
                if name not in exports:
                    self.option_reply(option, p.REP_ERR_UNKNOWN, b"no such export here")
                    continue
                self.option_reply(option, p.REP_INFO, p.EXPORT_INFO.pack(p.INFO_EXPORT, size, tflags))
                if block_size is not None:
                    self.option_reply(option, p.REP_INFO, p.BLOCK_SIZE_INFO.pack(p.INFO_BLOCK_SIZE, *block_size))
                self.option_reply(option, p.REP_ACK)
                return
            elif option == p.OPT_EXPORT_NAME:
                self.send(p.EXPORT_NAME_REPLY.pack(size, tflags) + (b"" if no_zeroes else bytes(124)))
                return
            else:
                self.option_reply(option, p.REP_ERR_UNSUP)

    # -- transmission ----------------------------------------------------------------------------

    def request(self) -> Request:
        magic, flags, kind, handle, offset, length = p.REQUEST.unpack(self.recv(p.REQUEST.size))
        assert magic == p.REQUEST_MAGIC
        req = Request(flags, kind, handle, offset, length)
        self.requests.append(req)
        return req

    def poll_request(self, wait: float) -> Request | None:
        """The next request if one comes within ``wait`` seconds (requests arrive whole)."""
        self.sock.settimeout(wait)
        try:
            head = self.sock.recv(p.REQUEST.size, socket.MSG_PEEK)
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(None)
        return self.request() if head else None

    def chunk(self, handle: int, kind: int, payload: bytes = b"", done: bool = True) -> None:
        self.send(p.encode_chunk(handle, kind, payload, done))

    def data(self, handle: int, offset: int, data: bytes, done: bool = True) -> None:
        self.send(p.encode_data_chunk(handle, offset, data, done))

    def hole(self, handle: int, offset: int, size: int, done: bool = True) -> None:
        self.send(p.encode_hole_chunk(handle, offset, size, done))

    def status(self, handle: int, context_id: int, runs: list[tuple[int, int]], done: bool = True) -> None:
        self.send(p.encode_status_chunk(handle, context_id, runs, done))

    def error(self, handle: int, errno: int, message: str = "", done: bool = True) -> None:
        self.send(p.encode_error_chunk(handle, errno, message, done))

    def simple(self, handle: int, error: int = 0, data: bytes = b"") -> None:
        self.send(p.encode_simple_reply(handle, error, data))

    def serve(
        self,
        disk: bytes,
        status: Callable[[Request], list[tuple[int, int]]] | None = None,
        structured: bool = True,
    ) -> None:
        """Answer requests honestly from ``disk`` until the client disconnects."""
        while True:
            req = self.request()
            if req.kind == p.CMD_DISC:
                return
            if req.kind == p.CMD_READ:
                data = disk[req.offset : req.offset + req.length]
                if structured:
                    self.data(req.handle, req.offset, data)
                else:
                    self.simple(req.handle, 0, data)
            elif req.kind == p.CMD_BLOCK_STATUS:
                pairs = status(req) if status else [(req.length, 0)]
                for context_id in self.contexts.values():
                    self.status(req.handle, context_id, pairs, done=False)
                self.chunk(req.handle, p.REPLY_TYPE_NONE)
            else:
                self.simple(req.handle, 22)


Script = Callable[[Peer], None]


class FakeServer:
    def __init__(self, script: Script) -> None:
        self.client_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer = Peer(server_sock, threading.Event())
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Script) -> None:
        try:
            script(self.peer)
        except PeerClosed:
            pass
        except BaseException as exc:  # surfaced by the fixture's teardown
            self.failure = exc

    def finish(self) -> None:
        self.peer.stop.set()
        self.thread.join(10)
        self.peer.close()
        self.client_sock.close()


@pytest.fixture
def fake_nbd() -> Iterator[Callable[[Script], FakeServer]]:
    servers: list[FakeServer] = []

    def start(script: Script) -> FakeServer:
        server = FakeServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.finish()
    for server in servers:
        if server.failure is not None:
            raise server.failure
