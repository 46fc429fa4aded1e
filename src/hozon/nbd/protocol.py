"""The NBD wire format: constants, byte layouts, and the pure encoders and decoders built on them.

Everything here is side-effect free, so the client (and later Hozon's own NBD server) share one
source of truth for the protocol, and tests can check the layouts without a socket. Names follow
the NBD protocol document (``doc/proto.md`` of the NetworkBlockDevice project); all integers are
big-endian ("network byte order").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from hozon.errors import NbdError

# -- handshake -----------------------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation, also the option magic
CLISERV_MAGIC: Final = 0x00420281861253  # oldstyle negotiation (not supported)
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE: Final = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0  # client flags
FLAG_C_NO_ZEROES: Final = 1 << 1

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

OPTION_REPLY_ERRORS: Final[dict[int, str]] = {
    REP_ERR_UNSUP: "the option is not supported",
    REP_ERR_POLICY: "refused by server policy",
    REP_ERR_INVALID: "the request is invalid",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "the server requires TLS",
    REP_ERR_UNKNOWN: "no such export",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    REP_ERR_TOO_BIG: "the request is too big",
}

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# -- transmission --------------------------------------------------------------------------------

# Transmission flags (sent with the export's size).
TFLAG_HAS_FLAGS: Final = 1 << 0
TFLAG_READ_ONLY: Final = 1 << 1
TFLAG_SEND_FLUSH: Final = 1 << 2
TFLAG_SEND_FUA: Final = 1 << 3
TFLAG_ROTATIONAL: Final = 1 << 4
TFLAG_SEND_TRIM: Final = 1 << 5
TFLAG_SEND_WRITE_ZEROES: Final = 1 << 6
TFLAG_SEND_DF: Final = 1 << 7
TFLAG_CAN_MULTI_CONN: Final = 1 << 8

REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3

REPLY_FLAG_DONE: Final = 1 << 0

REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_FLAG_ERROR: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_FLAG_ERROR | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_FLAG_ERROR | 2

# base:allocation flags
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
# qemu:dirty-bitmap:<name> flag
STATE_DIRTY: Final = 1 << 0

CONTEXT_BASE_ALLOCATION: Final = "base:allocation"
CONTEXT_DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"

# Error numbers an NBD server may send (the protocol fixes them; they are not the host's errno).
ERRNO_NAMES: Final[dict[int, tuple[str, str]]] = {
    1: ("EPERM", "operation not permitted"),
    5: ("EIO", "input/output error"),
    12: ("ENOMEM", "out of memory"),
    22: ("EINVAL", "invalid argument"),
    28: ("ENOSPC", "no space left on device"),
    75: ("EOVERFLOW", "value too large"),
    95: ("ENOTSUP", "operation not supported"),
    108: ("ESHUTDOWN", "server is shutting down"),
}

# -- limits --------------------------------------------------------------------------------------

MAX_STRING: Final = 4096  # the protocol's bound for names and messages
MAX_OPTION_REPLY: Final = 64 * 1024  # larger option replies are refused as malformed
MAX_REQUEST_DEFAULT: Final = 32 * 1024 * 1024  # reads/status beyond this are split (2^25, as the spec advises)
MAX_STATUS_DESCRIPTORS: Final = 1 << 20  # block status chunks are capped at 8 MiB of descriptors

# -- layouts -------------------------------------------------------------------------------------

HANDSHAKE_HEAD = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEAD = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEAD = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes unless NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR_HEAD = struct.Struct(">IH")  # error, message length
BLOCK_SIZE_INFO = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
EXPORT_INFO = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags


@dataclass(frozen=True)
class BlockSize:
    """The export's block size constraints (NBD_INFO_BLOCK_SIZE, or the protocol's defaults)."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = MAX_REQUEST_DEFAULT


# -- encoders ------------------------------------------------------------------------------------


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEAD.pack(IHAVEOPT, option, len(data)) + data


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"NBD strings are limited to {MAX_STRING} bytes: {text[:40]!r}…")
    return raw


def encode_go(export: str, info_requests: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    """The data of NBD_OPT_GO / NBD_OPT_INFO: export name and the info types asked for."""
    name = _string(export)
    infos = b"".join(U16.pack(i) for i in info_requests)
    return U32.pack(len(name)) + name + U16.pack(len(info_requests)) + infos


def encode_meta_context_query(export: str, queries: tuple[str, ...]) -> bytes:
    """The data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT."""
    name = _string(export)
    parts = [U32.pack(len(name)), name, U32.pack(len(queries))]
    for query in queries:
        raw = _string(query)
        parts += [U32.pack(len(raw)), raw]
    return b"".join(parts)


def encode_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


# The server's side (used by the tests' fake server, and by Hozon's own NBD server to come).


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEAD.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data


def encode_chunk_header(handle: int, kind: int, length: int, done: bool = True) -> bytes:
    """The header of a structured reply chunk announcing ``length`` bytes of payload."""
    flags = REPLY_FLAG_DONE if done else 0
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


def encode_chunk(handle: int, kind: int, payload: bytes = b"", done: bool = True) -> bytes:
    return encode_chunk_header(handle, kind, len(payload), done) + payload


def encode_data_chunk(handle: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return encode_chunk(handle, REPLY_TYPE_OFFSET_DATA, U64.pack(offset) + data, done)


def encode_hole_chunk(handle: int, offset: int, size: int, done: bool = True) -> bytes:
    return encode_chunk(handle, REPLY_TYPE_OFFSET_HOLE, OFFSET_HOLE.pack(offset, size), done)


def encode_status_chunk(handle: int, context_id: int, runs: list[tuple[int, int]], done: bool = True) -> bytes:
    """A block status chunk for ``context_id`` with ``(length, flags)`` runs."""
    words = [value for run in runs for value in run]
    return encode_chunk(handle, REPLY_TYPE_BLOCK_STATUS, struct.pack(f">I{len(words)}I", context_id, *words), done)


def encode_error_chunk(handle: int, error: int, message: str = "", done: bool = True) -> bytes:
    raw = message.encode("utf-8")[:MAX_STRING]
    return encode_chunk(handle, REPLY_TYPE_ERROR, ERROR_HEAD.pack(error, len(raw)) + raw, done)


# -- decoders ------------------------------------------------------------------------------------


def server_text(raw: bytes | bytearray | memoryview, limit: int = 200) -> str:
    """A server-supplied string made safe to show in a one-line message."""
    text = bytes(raw).decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "…"


def describe_errno(code: int) -> str:
    name, meaning = ERRNO_NAMES.get(code, (f"error {code}", "unknown error"))
    return f"{meaning} ({name})"


def parse_block_status(payload: bytes | bytearray | memoryview) -> tuple[int, list[tuple[int, int]]]:
    """Split a NBD_REPLY_TYPE_BLOCK_STATUS payload into its context id and (length, flags) pairs."""
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise NbdError(f"NBD server sent a block status chunk of malformed length {len(payload)}")
    count = (len(payload) - 4) // 8
    words = struct.unpack_from(f">{1 + 2 * count}I", payload)
    pairs = list(zip(words[1::2], words[2::2], strict=True))
    return words[0], pairs


def parse_error_payload(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """The (error number, message) of an error chunk; its trailing fields (an offset) are ignored."""
    if len(payload) < ERROR_HEAD.size:
        raise NbdError(f"NBD server sent an error chunk of malformed length {len(payload)}")
    code, msg_len = ERROR_HEAD.unpack_from(payload)
    if msg_len > len(payload) - ERROR_HEAD.size:
        raise NbdError("NBD server sent an error chunk whose message overruns the chunk")
    message = server_text(payload[ERROR_HEAD.size : ERROR_HEAD.size + msg_len])
    return code, message
