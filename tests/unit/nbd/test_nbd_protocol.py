"""The NBD wire layouts, checked byte for byte against the protocol document's descriptions."""

from __future__ import annotations

import struct

import pytest

from hozon.nbd import NbdError
from hozon.nbd import protocol as p


def test_request_layout() -> None:
    raw = p.encode_request(p.CMD_READ, handle=0x0102030405060708, offset=1 << 40, length=65536)
    assert len(raw) == 28
    assert raw[:4] == bytes.fromhex("25609513")
    assert raw[4:8] == b"\0\0\0\0"  # command flags, then type READ (0)
    assert raw[8:16] == bytes.fromhex("0102030405060708")
    assert raw[16:24] == (1 << 40).to_bytes(8, "big")
    assert raw[24:] == (65536).to_bytes(4, "big")
    assert p.encode_request(p.CMD_BLOCK_STATUS, 1, 0, 1, p.CMD_FLAG_REQ_ONE)[4:8] == bytes.fromhex("00080007")


def test_option_layouts() -> None:
    assert p.encode_option(p.OPT_STRUCTURED_REPLY) == b"IHAVEOPT" + bytes.fromhex("00000008 00000000")
    go = p.encode_go("disk", (p.INFO_BLOCK_SIZE,))
    assert go == bytes.fromhex("00000004") + b"disk" + bytes.fromhex("0001 0003")
    query = p.encode_meta_context_query("", ("base:allocation", "qemu:dirty-bitmap:b0"))
    assert query == (
        bytes.fromhex("00000000 00000002 0000000f")
        + b"base:allocation"
        + bytes.fromhex("00000014")
        + b"qemu:dirty-bitmap:b0"
    )
    assert p.encode_option_reply(p.OPT_GO, p.REP_ACK)[:8] == bytes.fromhex("0003e889045565a9")


def test_names_longer_than_the_protocol_allows_are_refused() -> None:
    with pytest.raises(ValueError):
        p.encode_go("x" * 5000)


def test_reply_layouts() -> None:
    assert p.encode_simple_reply(7, 5) == bytes.fromhex("67446698 00000005 0000000000000007")
    chunk = p.encode_data_chunk(9, 4096, b"abc", done=True)
    assert chunk[:4] == bytes.fromhex("668e33ef")
    assert struct.unpack(">HHQI", chunk[4:20]) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 9, 11)
    assert chunk[20:] == (4096).to_bytes(8, "big") + b"abc"
    assert p.REPLY_TYPE_ERROR == 0x8001 and p.REPLY_TYPE_ERROR_OFFSET == 0x8002


def test_block_status_payload_round_trip() -> None:
    chunk = p.encode_status_chunk(1, 3, [(65536, p.STATE_HOLE | p.STATE_ZERO), (4096, 0)])
    assert p.parse_block_status(chunk[p.STRUCTURED_REPLY.size :]) == (3, [(65536, 3), (4096, 0)])


@pytest.mark.parametrize("payload", [b"", struct.pack(">I", 1), struct.pack(">III", 1, 2, 3) + b"x"])
def test_malformed_block_status_payload(payload: bytes) -> None:
    with pytest.raises(NbdError, match="malformed length"):
        p.parse_block_status(payload)


def test_error_payload() -> None:
    chunk = p.encode_error_chunk(1, 5, "bad\nsector")
    assert p.parse_error_payload(chunk[p.STRUCTURED_REPLY.size :]) == (5, "bad?sector")
    with pytest.raises(NbdError, match="overruns"):
        p.parse_error_payload(struct.pack(">IH", 5, 10) + b"short")
    with pytest.raises(NbdError, match="malformed length"):
        p.parse_error_payload(b"\0\0")


def test_server_text_is_one_short_printable_line() -> None:
    assert p.server_text(b"\xff\x1b[2Jhello") == "\ufffd?[2Jhello"
    assert len(p.server_text(b"a" * 1000)) == 201
    assert p.describe_errno(5) == "input/output error (EIO)"
    assert p.describe_errno(999) == "unknown error (error 999)"
