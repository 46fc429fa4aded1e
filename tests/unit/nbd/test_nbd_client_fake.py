"""NbdClient against a scripted fake server: legal-but-unusual replies, and broken ones.

Every broken reply must end in an NbdError within the client's timeout, never a hang, and leave
the client refusing further use rather than reading a stream that is out of step.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import pytest

from hozon.errors import HozonError
from hozon.nbd import Extent, NbdClient, NbdError
from hozon.nbd import protocol as p

if TYPE_CHECKING:  # the fake server lives in this directory's conftest.py
    from conftest import FakeServer, Peer, Request

pytestmark = pytest.mark.timeout(20)

Start: TypeAlias = "Callable[[Callable[[Peer], None]], FakeServer]"
DISK = os.urandom(1 << 20)
TIMEOUT = 1.0


def connect(server: FakeServer, **kwargs: object) -> NbdClient:
    kwargs.setdefault("timeout", TIMEOUT)
    return NbdClient(server.client_sock, **kwargs)  # type: ignore[arg-type]


def honest(peer: Peer) -> None:
    peer.handshake(len(DISK))
    peer.serve(DISK)


# -- good servers, unusual replies ---------------------------------------------------------------


def test_handshake_reports_size_flags_and_contexts(fake_nbd: Start) -> None:
    server = fake_nbd(honest)
    with connect(server) as client:
        assert client.size == len(DISK)
        assert client.read_only
        assert client.structured_replies
        assert client.meta_contexts == ("base:allocation",)
        assert client.read(4096, 100) == DISK[4096:4196]
    server.thread.join(5)
    assert server.peer.options == [p.OPT_STRUCTURED_REPLY, p.OPT_SET_META_CONTEXT, p.OPT_GO]
    assert server.peer.requests[-1].kind == p.CMD_DISC


def test_nbd_error_is_a_hozon_error() -> None:
    assert issubclass(NbdError, HozonError)
    assert NbdError("x").exit_code == 1


def test_read_reassembles_chunks_sent_in_any_order(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        req = peer.request()
        quarter = req.length // 4
        base = req.offset
        peer.data(req.handle, base + 3 * quarter, DISK[base + 3 * quarter : base + req.length], done=False)
        peer.hole(req.handle, base + quarter, quarter, done=False)
        peer.data(req.handle, base, DISK[base : base + quarter], done=False)
        peer.data(req.handle, base + 2 * quarter, DISK[base + 2 * quarter : base + 3 * quarter], done=False)
        peer.chunk(req.handle, p.REPLY_TYPE_NONE)
        peer.serve(DISK)

    with connect(fake_nbd(script)) as client:
        data = client.read(8192, 4096)
        assert data == DISK[8192:9216] + bytes(1024) + DISK[10240:12288]
        assert client.read(0, 10) == DISK[:10]  # still in step afterwards


def test_read_many_yields_in_order_when_replies_come_out_of_order(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        while True:
            batch = [peer.request() for _ in range(4)]
            if batch[0].kind == p.CMD_DISC:
                return
            # answer the newest first, with the halves of different replies interleaved
            for req in reversed(batch):
                half = req.length // 2
                peer.data(req.handle, req.offset + half, DISK[req.offset + half : req.offset + req.length], False)
            for req in batch:
                half = req.length // 2
                peer.data(req.handle, req.offset, DISK[req.offset : req.offset + half])

    wanted = [(i * 65536, 65536) for i in range(8)]
    with connect(fake_nbd(script)) as client:
        got = list(client.read_many(wanted, depth=4))
    assert [offset for offset, _ in got] == [offset for offset, _ in wanted]
    for offset, data in got:
        assert data == DISK[offset : offset + 65536]


def test_read_many_keeps_depth_requests_in_flight(fake_nbd: Start) -> None:
    too_many: list[Request] = []

    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        # The server answers nothing until three requests are in, so the client must send them
        # unprompted; then one answer at a time must bring exactly one new request, never two.
        pending = deque(peer.request() for _ in range(3))
        received = 3
        while pending:
            extra = peer.poll_request(0.1)
            if extra is not None:
                too_many.append(extra)
            req = pending.popleft()
            peer.data(req.handle, req.offset, DISK[req.offset : req.offset + req.length])
            if received < 12:
                pending.append(peer.request())
                received += 1
        peer.serve(DISK)

    with connect(fake_nbd(script)) as client:
        results = list(client.read_many(((i * 4096, 4096) for i in range(12)), depth=3))
    assert [offset for offset, _ in results] == [i * 4096 for i in range(12)]
    assert all(data == DISK[offset : offset + 4096] for offset, data in results)
    assert too_many == []


def test_leaving_read_many_early_keeps_the_connection_usable(fake_nbd: Start) -> None:
    with connect(fake_nbd(honest)) as client:
        for offset, _ in client.read_many(((i * 1000, 1000) for i in range(50)), depth=8):
            if offset >= 3000:
                break
        assert client.read(123, 456) == DISK[123:579]


def test_zero_length_and_empty_requests(fake_nbd: Start) -> None:
    with connect(fake_nbd(honest)) as client:
        assert client.read(100, 0) == b""
        assert list(client.read_many([(5, 0), (0, 3), (len(DISK), 0)])) == [(5, b""), (0, DISK[:3]), (len(DISK), b"")]
        assert list(client.read_many([])) == []


def test_ranges_outside_the_disk_are_refused(fake_nbd: Start) -> None:
    with connect(fake_nbd(honest)) as client:
        with pytest.raises(ValueError):
            client.read(len(DISK) - 10, 11)
        with pytest.raises(ValueError):
            client.read(-1, 1)
        with pytest.raises(ValueError):
            list(client.read_many([(0, 10), (len(DISK), 1)]))
        assert client.read(0, 10) == DISK[:10]


def test_block_size_constraints_split_and_align_requests(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK), block_size=(512, 4096, 65536))
        peer.serve(DISK)

    server = fake_nbd(script)
    with connect(server) as client:
        assert client.max_request == 65536
        assert client.read(1000, 300_000) == DISK[1000:301_000]
        assert client.read(len(DISK) - 7, 7) == DISK[-7:]
        extents = client.allocation(100, 200_000)
    reads = [r for r in server.peer.requests if r.kind in (p.CMD_READ, p.CMD_BLOCK_STATUS)]
    assert all(r.length <= 65536 and r.offset % 512 == 0 and r.length % 512 == 0 for r in reads)
    assert extents == [Extent(100, 200_000, False)]


def test_structured_replies_refused_falls_back_to_simple_replies(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK), structured=False)
        peer.serve(DISK, structured=False)

    with connect(fake_nbd(script)) as client:
        assert not client.structured_replies
        assert client.meta_contexts == ()
        assert client.read(70_000, 200_000) == DISK[70_000:270_000]
        with pytest.raises(NbdError, match="structured replies"):
            client.allocation()


def test_old_servers_without_opt_go_use_export_name(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK), go=False, hflags=p.FLAG_FIXED_NEWSTYLE)
        peer.serve(DISK)

    with connect(fake_nbd(script)) as client:
        assert client.size == len(DISK)
        assert client.read(1, 2) == DISK[1:3]


def test_block_status_walks_short_replies_and_clips_long_ones(fake_nbd: Start) -> None:
    def status(req: Request) -> list[tuple[int, int]]:
        # runs on a 3000-byte grid, alternating data / zero; describe at most ~20 kB of what was
        # asked, and let the last run overshoot the end of the request
        pairs = []
        pos = req.offset
        while pos < req.offset + min(req.length, 20_000):
            grid = (pos // 3000 + 1) * 3000
            pairs.append((grid - pos, 0 if (pos // 3000) % 2 == 0 else p.STATE_HOLE | p.STATE_ZERO))
            pos = grid
        return pairs

    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        peer.serve(DISK, status=status)

    with connect(fake_nbd(script)) as client:
        runs = client.block_status("base:allocation", 0, 100_000)
        extents = client.allocation(1500, 10_000)
    assert runs[0][0] == 0 and sum(length for _, length, _ in runs) == 100_000
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert extents == [
        Extent(1500, 1500, False),
        Extent(3000, 3000, True),
        Extent(6000, 3000, False),
        Extent(9000, 2500, True),
    ]


def test_block_status_needs_an_agreed_context(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK), contexts=("base:allocation",))
        peer.serve(DISK)

    with connect(fake_nbd(script), meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0")) as client:
        assert client.meta_contexts == ("base:allocation",)
        with pytest.raises(NbdError, match="qemu:dirty-bitmap:b0") as info:
            client.dirty_extents("b0")
        assert info.value.hint is not None and "--bitmap" in info.value.hint
        assert client.allocation() == [Extent(0, len(DISK), False)]


def test_dirty_extents_with_two_contexts(fake_nbd: Start) -> None:
    dirty = {(65536, 131072), (524288, 65536)}

    def script(peer: Peer) -> None:
        peer.handshake(len(DISK), contexts=("base:allocation", "qemu:dirty-bitmap:b0"))
        while True:
            req = peer.request()
            if req.kind == p.CMD_DISC:
                return
            peer.status(req.handle, peer.contexts["base:allocation"], [(req.length, 0)], done=False)
            pairs, pos = [], req.offset
            for start, length in sorted(dirty):
                if start > pos:
                    pairs.append((start - pos, 0))
                pairs.append((length, p.STATE_DIRTY))
                pos = start + length
            pairs.append((req.offset + req.length - pos, 0))
            peer.status(req.handle, peer.contexts["qemu:dirty-bitmap:b0"], pairs)

    with connect(fake_nbd(script), meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0")) as client:
        assert client.dirty_extents("b0") == sorted(dirty)


def test_server_error_fails_the_request_but_not_the_connection(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        req = peer.request()
        peer.data(req.handle, req.offset, DISK[req.offset : req.offset + 10], done=False)
        peer.error(req.handle, 5, "disk on fire")
        req = peer.request()
        peer.simple(req.handle, 1)  # a simple error reply is allowed, even in structured mode
        peer.serve(DISK)

    with connect(fake_nbd(script)) as client:
        with pytest.raises(NbdError, match=r"failed to read 20 bytes at offset 0: input/output error \(EIO\)"):
            client.read(0, 20)
        with pytest.raises(NbdError, match="EPERM"):
            client.read(0, 20)
        assert client.read(0, 20) == DISK[:20]


def test_server_error_in_read_many_settles_the_other_requests(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        batch = [peer.request() for _ in range(4)]
        peer.error(batch[0].handle, 5, "bad sector")
        for req in batch[1:]:
            peer.data(req.handle, req.offset, DISK[req.offset : req.offset + req.length])
        peer.serve(DISK)

    with connect(fake_nbd(script)) as client:
        with pytest.raises(NbdError, match="bad sector"):
            list(client.read_many([(i * 100, 100) for i in range(4)], depth=4))
        assert client.read(0, 100) == DISK[:100]


def test_unknown_export_is_named(fake_nbd: Start) -> None:
    server = fake_nbd(lambda peer: peer.handshake(len(DISK), exports=("disk0",)))
    with pytest.raises(NbdError, match="no export named 'nope'"):
        connect(server, export="nope")


def test_tls_only_server_is_explained(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.send(p.HANDSHAKE_HEAD.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
        peer.recv(4)
        _, option, length = p.OPTION_HEAD.unpack(peer.recv(16))
        peer.recv(length)
        peer.option_reply(option, p.REP_ERR_TLS_REQD, b"TLS please")
        peer.recv(1)

    with pytest.raises(NbdError, match="requires TLS") as info:
        connect(fake_nbd(script))
    assert info.value.hint


# -- broken servers ------------------------------------------------------------------------------


def sends(data: bytes, then: str = "stall") -> Callable[[Peer], None]:
    """A server script: send ``data`` at once, then stall or close."""

    def script(peer: Peer) -> None:
        peer.send(data)
        if then == "stall":
            peer.stall()
        else:
            peer.close()

    return script


def _broken_handshakes() -> dict[str, Callable[[Peer], None]]:
    greeting = p.HANDSHAKE_HEAD.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)

    def first_option(peer: Peer) -> int:
        peer.send(greeting)
        peer.recv(4)
        _, option, length = p.OPTION_HEAD.unpack(peer.recv(16))
        peer.recv(length)
        return int(option)

    def answers(reply: Callable[[int], bytes], then: str = "stall") -> Callable[[Peer], None]:
        """A server script: greet, then answer the first option with ``reply(option)``."""

        def script(peer: Peer) -> None:
            sends(reply(first_option(peer)), then)(peer)

        return script

    def go_without_size(peer: Peer) -> None:
        peer.option_reply(first_option(peer), p.REP_ERR_UNSUP)  # no structured replies
        _, option, length = p.OPTION_HEAD.unpack(peer.recv(16))
        peer.recv(length)
        peer.option_reply(option, p.REP_ACK)
        peer.stall()

    def impossible_block_size(peer: Peer) -> None:
        peer.handshake(block_size=(3, 4096, 1 << 20))
        peer.stall()

    reply = p.OPTION_REPLY_HEAD.pack
    return {
        "not NBD": sends(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        "oldstyle": sends(struct.pack(">QQ", p.NBDMAGIC, p.CLISERV_MAGIC)),
        "not fixed newstyle": sends(p.HANDSHAKE_HEAD.pack(p.NBDMAGIC, p.IHAVEOPT, 0)),
        "silent": sends(b""),
        "closes at once": sends(b"", "close"),
        "closes mid greeting": sends(b"NBDMAG", "close"),
        "stalls mid greeting": sends(b"NBDMAGICIHAV"),
        "bad option reply magic": answers(lambda opt: reply(0x1234, opt, p.REP_ACK, 0)),
        "oversized option reply": answers(lambda opt: reply(p.OPTION_REPLY_MAGIC, opt, p.REP_ACK, 0xFFFFFFFF)),
        "wrong option echoed": answers(lambda opt: reply(p.OPTION_REPLY_MAGIC, p.OPT_LIST, p.REP_ACK, 0)),
        "truncated option reply": answers(
            lambda opt: reply(p.OPTION_REPLY_MAGIC, opt, p.REP_ERR_POLICY, 100) + b"half", "close"
        ),
        "GO without export size": go_without_size,
        "impossible block size": impossible_block_size,
    }


@pytest.mark.parametrize("script", _broken_handshakes().values(), ids=_broken_handshakes().keys())
def test_broken_handshake_fails_fast(fake_nbd: Start, script: Callable[[Peer], None]) -> None:
    server = fake_nbd(script)
    started = time.monotonic()
    with pytest.raises(NbdError) as info:
        connect(server)
    assert time.monotonic() - started < 8  # a few timeouts at most, never a hang
    assert "\n" not in str(info.value)
    assert server.client_sock.fileno() == -1  # the client closed its socket


def _broken_replies() -> dict[str, tuple[Callable[[Request], bytes], str]]:
    """What a broken server sends in reply to a 4 KiB read, and whether it then stalls or closes."""
    data, header = p.REPLY_TYPE_OFFSET_DATA, p.encode_chunk_header
    return {
        "bad magic": (lambda r: struct.pack(">IIQ", 0xDEADBEEF, 0, r.handle), "stall"),
        "unknown handle": (lambda r: p.encode_data_chunk(r.handle + 1000, r.offset, bytes(r.length)), "stall"),
        "closes before replying": (lambda r: b"", "close"),
        "closes mid header": (lambda r: struct.pack(">IH", p.STRUCTURED_REPLY_MAGIC, 1), "close"),
        "truncated data then close": (
            lambda r: header(r.handle, data, 8 + r.length) + struct.pack(">Q", r.offset) + bytes(10),
            "close",
        ),
        "truncated data then silence": (
            lambda r: header(r.handle, data, 8 + r.length) + struct.pack(">Q", r.offset) + bytes(10),
            "stall",
        ),
        "header then silence": (lambda r: header(r.handle, data, 8 + r.length), "stall"),
        "never replies": (lambda r: b"", "stall"),
        "oversized data chunk": (lambda r: header(r.handle, data, 0xFFFFFFFF), "stall"),
        "data outside the request": (lambda r: p.encode_data_chunk(r.handle, r.offset + 1, bytes(r.length)), "stall"),
        "done before all data": (lambda r: p.encode_data_chunk(r.handle, r.offset, bytes(r.length - 1)), "stall"),
        "overlapping chunks": (
            lambda r: (
                p.encode_data_chunk(r.handle, r.offset, bytes(r.length - 1), done=False)
                + p.encode_data_chunk(r.handle, r.offset + 1, bytes(r.length - 1))
            ),
            "stall",
        ),
        "hole chunk of wrong length": (
            lambda r: p.encode_chunk(r.handle, p.REPLY_TYPE_OFFSET_HOLE, bytes(16)),
            "stall",
        ),
        "unknown chunk type": (lambda r: p.encode_chunk(r.handle, 77, b"xx"), "stall"),
        "status chunk for a read": (lambda r: p.encode_status_chunk(r.handle, 1, [(r.length, 0)]), "stall"),
        "oversized error chunk": (lambda r: header(r.handle, p.REPLY_TYPE_ERROR, 1 << 30), "stall"),
        "error message overruns": (
            lambda r: p.encode_chunk(r.handle, p.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 50)),
            "stall",
        ),
        "none chunk not final": (lambda r: p.encode_chunk(r.handle, p.REPLY_TYPE_NONE, done=False), "stall"),
        "simple reply with data in structured mode": (
            lambda r: p.encode_simple_reply(r.handle, 0, bytes(r.length)),
            "stall",
        ),
    }


@pytest.mark.parametrize("reply", _broken_replies().values(), ids=_broken_replies().keys())
def test_broken_read_reply_fails_fast(fake_nbd: Start, reply: tuple[Callable[[Request], bytes], str]) -> None:
    build, then = reply

    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        sends(build(peer.request()), then)(peer)

    client = connect(fake_nbd(script))
    started = time.monotonic()
    with pytest.raises(NbdError) as info:
        client.read(4096, 4096)
    assert time.monotonic() - started < 8  # a few timeouts at most, never a hang
    assert "\n" not in str(info.value)
    with pytest.raises(NbdError, match=r"failed earlier|closed"):
        client.read(0, 1)
    client.close()


@pytest.mark.parametrize(
    "pairs_payload",
    [
        pytest.param(struct.pack(">I", 1), id="no descriptors"),
        pytest.param(struct.pack(">III", 1, 4096, 0) + b"abc", id="ragged length"),
        pytest.param(struct.pack(">III", 9, 4096, 0), id="unknown context id"),
    ],
)
def test_broken_block_status_reply_fails_fast(fake_nbd: Start, pairs_payload: bytes) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        req = peer.request()
        peer.chunk(req.handle, p.REPLY_TYPE_BLOCK_STATUS, pairs_payload)
        peer.stall()

    with connect(fake_nbd(script)) as client, pytest.raises(NbdError):
        client.allocation()


def test_block_status_without_progress_fails(fake_nbd: Start) -> None:
    def script(peer: Peer) -> None:
        peer.handshake(len(DISK))
        while True:
            req = peer.request()
            if req.kind == p.CMD_DISC:
                return
            peer.status(req.handle, 1, [(0, 0)])

    with connect(fake_nbd(script)) as client, pytest.raises(NbdError, match="no extent"):
        client.allocation(0, 8192)


def test_closed_client_refuses_work(fake_nbd: Start) -> None:
    client = connect(fake_nbd(honest))
    client.close()
    client.close()
    with pytest.raises(NbdError, match="closed"):
        client.read(0, 1)
