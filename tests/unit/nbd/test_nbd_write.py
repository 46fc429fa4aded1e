"""NbdClient writing to a scripted fake server: what goes on the wire, and how failures surface.

The fake server keeps the disk in a bytearray; each script says how it answers writes (simple
or structured replies, errors, odd chunks). Against real qemu-nbd see
tests/e2e/test_nbd_write_qemu.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import pytest

from hozon.nbd import NbdClient, NbdError, NbdRequestError
from hozon.nbd import protocol as p

if TYPE_CHECKING:  # the fake server lives in this directory's conftest.py
    from conftest import FakeServer, Peer, Request

pytestmark = pytest.mark.timeout(20)

Start: TypeAlias = "Callable[[Callable[[Peer], None]], FakeServer]"
SIZE = 1 << 20
TIMEOUT = 1.0
WRITABLE = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM
            | p.TFLAG_SEND_WRITE_ZEROES)


def connect(server: FakeServer, **kwargs: object) -> NbdClient:
    kwargs.setdefault("timeout", TIMEOUT)
    kwargs.setdefault("meta_contexts", ())
    return NbdClient(server.client_sock, **kwargs)  # type: ignore[arg-type]


def apply(peer: Peer, req: Request, disk: bytearray) -> None:
    """Carry out ``req`` on ``disk`` (reading a write's payload off the wire)."""
    if req.kind == p.CMD_WRITE:
        disk[req.offset : req.offset + req.length] = peer.recv(req.length)
    elif req.kind in (p.CMD_WRITE_ZEROES, p.CMD_TRIM):
        disk[req.offset : req.offset + req.length] = bytes(req.length)


def serve_writes(disk: bytearray, structured_ok: bool = False, **handshake: object) -> Callable[[Peer], None]:
    """A script for an honest writable server: simple replies (as QEMU sends) or structured ones."""

    def script(peer: Peer) -> None:
        peer.handshake(len(disk), contexts=(), **handshake)  # type: ignore[arg-type]
        while True:
            req = peer.request()
            if req.kind == p.CMD_DISC:
                return
            if req.kind == p.CMD_READ:
                peer.data(req.handle, req.offset, bytes(disk[req.offset : req.offset + req.length]))
                continue
            apply(peer, req, disk)
            if structured_ok:
                peer.chunk(req.handle, p.REPLY_TYPE_NONE)
            else:
                peer.simple(req.handle)

    return script


# -- writes that succeed -------------------------------------------------------------------------


@pytest.mark.parametrize("structured_ok", [False, True], ids=["simple-reply", "structured-reply"])
def test_write_lands_and_reads_back(fake_nbd: Start, structured_ok: bool) -> None:
    disk = bytearray(SIZE)
    data = os.urandom(100_000)
    server = fake_nbd(serve_writes(disk, structured_ok, tflags=WRITABLE))
    with connect(server) as client:
        assert not client.read_only
        client.write(4096, data)
        client.write(0, memoryview(b"abc"))
        client.flush()
        assert client.read(4096, len(data)) == data
    server.thread.join(5)
    assert bytes(disk[4096 : 4096 + len(data)]) == data
    assert bytes(disk[:3]) == b"abc"
    kinds = [r.kind for r in server.peer.requests]
    assert kinds == [p.CMD_WRITE, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_READ, p.CMD_DISC]


def test_writes_are_split_at_the_maximum_block_size(fake_nbd: Start) -> None:
    disk = bytearray(SIZE)
    data = os.urandom(200 * 1024)
    server = fake_nbd(serve_writes(disk, tflags=WRITABLE, block_size=(512, 4096, 64 * 1024)))
    with connect(server) as client:
        assert client.write_many([(8192, data)], depth=2) == len(data)
        client.write_zeroes(0, 256 * 1024)
    server.thread.join(5)
    writes = [(r.offset, r.length) for r in server.peer.requests if r.kind == p.CMD_WRITE]
    assert writes == [(8192, 65536), (73728, 65536), (139264, 65536), (204800, 8192)]
    zeroes = [(r.offset, r.length) for r in server.peer.requests if r.kind == p.CMD_WRITE_ZEROES]
    assert zeroes == [(i * 65536, 65536) for i in range(4)]
    assert bytes(disk[:8192]) == bytes(8192)


def test_unaligned_write_is_refused_before_sending(fake_nbd: Start) -> None:
    disk = bytearray(SIZE)
    server = fake_nbd(serve_writes(disk, tflags=WRITABLE, block_size=(512, 4096, 65536)))
    with connect(server) as client:
        with pytest.raises(ValueError, match="minimum block size 512"):
            client.write(100, b"x" * 512)
        with pytest.raises(ValueError, match="outside the export"):
            client.write(SIZE - 512, b"x" * 1024)
        client.write(SIZE - 512, b"y" * 512)  # still usable
    server.thread.join(5)
    assert [r.kind for r in server.peer.requests] == [p.CMD_WRITE, p.CMD_DISC]


def test_write_many_keeps_depth_writes_in_flight(fake_nbd: Start) -> None:
    disk = bytearray(SIZE)
    too_many: list[Request] = []

    def script(peer: Peer) -> None:
        peer.handshake(SIZE, contexts=(), tflags=WRITABLE)
        pending = []
        for _ in range(3):  # nothing is answered until three writes are in
            req = peer.request()
            apply(peer, req, disk)
            pending.append(req)
        received = 3
        while pending:
            extra = peer.poll_request(0.1)  # one answer at a time must bring one new write, not two
            if extra is not None:
                too_many.append(extra)
            peer.simple(pending.pop(0).handle)
            if received < 10:
                nxt = peer.request()
                apply(peer, nxt, disk)
                pending.append(nxt)
                received += 1
        peer.request()  # NBD_CMD_DISC

    pieces = [(i * 4096, bytes([i]) * 4096) for i in range(10)]
    server = fake_nbd(script)
    with connect(server) as client:
        assert client.write_many(iter(pieces), depth=3) == 10 * 4096
    server.thread.join(5)
    assert not too_many
    for offset, data in pieces:
        assert bytes(disk[offset : offset + 4096]) == data


def test_write_zeroes_may_punch_holes_unless_told_not_to(fake_nbd: Start) -> None:
    disk = bytearray(os.urandom(SIZE))
    server = fake_nbd(serve_writes(disk, tflags=WRITABLE))
    with connect(server) as client:
        assert client.can_write_zeroes
        client.write_zeroes(0, 4096)
        client.write_zeroes(8192, 4096, punch_hole=False)
        client.trim(65536, 4096)
    server.thread.join(5)
    zeroes = [r for r in server.peer.requests if r.kind == p.CMD_WRITE_ZEROES]
    assert [(r.offset, r.flags) for r in zeroes] == [(0, 0), (8192, p.CMD_FLAG_NO_HOLE)]
    assert [(r.offset, r.length) for r in server.peer.requests if r.kind == p.CMD_TRIM] == [(65536, 4096)]
    assert bytes(disk[:4096]) == bytes(disk[8192:12288]) == bytes(4096)


def test_servers_without_write_zeroes_trim_or_flush(fake_nbd: Start) -> None:
    disk = bytearray(os.urandom(SIZE))
    server = fake_nbd(serve_writes(disk, tflags=p.TFLAG_HAS_FLAGS))
    with connect(server) as client:
        assert not client.can_write_zeroes
        client.write_zeroes(4096, 100_000)  # sent as ordinary writes of zero bytes
        client.trim(0, 4096)  # advisory: not sent
        client.flush()  # no volatile cache: not sent
    server.thread.join(5)
    assert {r.kind for r in server.peer.requests} == {p.CMD_WRITE, p.CMD_DISC}
    assert bytes(disk[4096:104096]) == bytes(100_000)


# -- writes that fail ----------------------------------------------------------------------------


def test_read_only_export_refuses_writes_without_sending(fake_nbd: Start) -> None:
    disk = bytearray(SIZE)
    server = fake_nbd(serve_writes(disk, tflags=p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY | p.TFLAG_SEND_FLUSH))
    with connect(server) as client:
        assert client.read_only
        for attempt in (lambda: client.write(0, b"x"), lambda: client.write_zeroes(0, 10),
                        lambda: client.trim(0, 10), client.flush):
            with pytest.raises(NbdError, match="read-only, so it cannot be written") as info:
                attempt()
            assert info.value.hint and "--read-only" in info.value.hint
        assert client.read(0, 4) == bytes(4)
    server.thread.join(5)
    assert [r.kind for r in server.peer.requests] == [p.CMD_READ, p.CMD_DISC]


@pytest.mark.parametrize("structured", [False, True], ids=["simple-error", "error-chunk"])
def test_error_reply_to_a_write_fails_it_and_keeps_the_connection(fake_nbd: Start, structured: bool) -> None:
    disk = bytearray(SIZE)

    def script(peer: Peer) -> None:
        peer.handshake(SIZE, contexts=(), tflags=WRITABLE)
        req = peer.request()
        peer.recv(req.length)  # the payload is read but not stored
        if structured:
            peer.error(req.handle, 28, "image file is full")
        else:
            peer.simple(req.handle, 28)
        while True:
            req = peer.request()
            if req.kind == p.CMD_DISC:
                return
            apply(peer, req, disk)
            peer.simple(req.handle)

    with connect(fake_nbd(script)) as client:
        with pytest.raises(NbdRequestError, match=r"failed to write 65536 bytes at offset 4096: "
                                                  r"no space left on device \(ENOSPC\)") as info:
            client.write(4096, b"a" * 65536)
        assert info.value.code == 28
        assert isinstance(info.value, NbdError)
        if structured:
            assert "image file is full" in info.value.message
        client.write(0, b"ok")
        client.flush()
    assert bytes(disk[:2]) == b"ok"
    assert bytes(disk[4096:8192]) == bytes(4096)


def test_write_many_stops_at_the_first_error_reply(fake_nbd: Start) -> None:
    disk = bytearray(SIZE)
    seen: list[Request] = []

    def script(peer: Peer) -> None:
        peer.handshake(SIZE, contexts=(), tflags=WRITABLE)
        batch = []
        for _ in range(4):
            batch.append(peer.request())
            peer.recv(batch[-1].length)
        peer.error(batch[1].handle, 5, "bad sector")  # the second fails first ...
        peer.simple(batch[0].handle)  # ... then the head succeeds: the client must stop here
        extra = peer.poll_request(0.3)
        if extra is not None:
            seen.append(extra)
        for req in batch[2:]:
            peer.simple(req.handle)
        while True:
            req = extra or peer.request()
            extra = None
            seen.append(req)
            if req.kind == p.CMD_DISC:
                return
            apply(peer, req, disk)
            peer.simple(req.handle)

    pieces = ((i * 4096, b"w" * 4096) for i in range(100))
    server = fake_nbd(script)
    with connect(server) as client:
        with pytest.raises(NbdRequestError, match="bad sector"):
            client.write_many(pieces, depth=4)
        client.flush()  # the connection is in step: the two writes still in flight were waited out
    server.thread.join(5)
    assert [r.kind for r in seen] == [p.CMD_FLUSH, p.CMD_DISC]


def test_data_chunk_in_reply_to_a_write_breaks_the_connection(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(SIZE, contexts=(), tflags=WRITABLE)
        req = peer.request()
        peer.recv(req.length)
        peer.data(req.handle, req.offset, b"nonsense")
        peer.stall()

    with connect(fake_nbd(script)) as client:
        with pytest.raises(NbdError, match="unexpected reply chunk"):
            client.write(0, b"x" * 16)
        with pytest.raises(NbdError, match="failed earlier"):
            client.write(0, b"x")


def test_simple_success_reply_to_block_status_is_still_refused(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(SIZE, tflags=WRITABLE)
        req = peer.request()
        peer.simple(req.handle)
        peer.stall()

    with connect(fake_nbd(script), meta_contexts=("base:allocation",)) as client, \
            pytest.raises(NbdError, match="simple reply where a structured one was required"):
        client.allocation()
