"""The client's side of fixed newstyle negotiation, from the server's greeting to transmission.

Options are sent in this order: NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT (when
structured replies were agreed and contexts are wanted), then NBD_OPT_GO asking for
NBD_INFO_BLOCK_SIZE — which promises the server that requests will honour its block sizes.
A server too old for NBD_OPT_GO gets NBD_OPT_EXPORT_NAME instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hozon.errors import NbdError
from hozon.nbd import protocol as p
from hozon.nbd.protocol import BlockSize
from hozon.nbd.transport import Transport


@dataclass(frozen=True)
class Negotiated:
    """What the handshake settled: the export and how to talk to it."""

    size: int
    transmission_flags: int
    block_size: BlockSize
    structured_replies: bool
    contexts: dict[str, int] = field(default_factory=dict)  # metadata context name -> id


def negotiate(wire: Transport, export: str, meta_contexts: tuple[str, ...]) -> Negotiated:
    """Run the handshake on ``wire``; any refusal or malformed reply raises NbdError."""
    return _Handshake(wire, export).run(meta_contexts)


class _Handshake:
    def __init__(self, wire: Transport, export: str) -> None:
        self.wire = wire
        self.where = wire.where
        self.export = export
        self.size = 0
        self.transmission_flags = 0
        self.block_size = BlockSize()
        self.contexts: dict[str, int] = {}

    def run(self, meta_contexts: tuple[str, ...]) -> Negotiated:
        head = self.wire.recv_bytes(16, first=True)
        magic, second = p.U64.unpack_from(head)[0], p.U64.unpack_from(head, 8)[0]
        if magic != p.NBDMAGIC:
            peer = self.wire.address or "the server"
            raise NbdError(f"{peer} is not an NBD server: its greeting starts 0x{magic:016x}")
        if second == p.CLISERV_MAGIC:
            raise NbdError(f"{self.where} only speaks oldstyle negotiation, which Hozon does not support")
        if second != p.IHAVEOPT:
            raise NbdError(f"{self.where} sent an unknown negotiation magic 0x{second:016x}")
        (server_flags,) = p.U16.unpack(self.wire.recv_bytes(2))
        if not server_flags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.where} does not support fixed newstyle negotiation")
        no_zeroes = bool(server_flags & p.FLAG_NO_ZEROES)
        self.wire.send(p.U32.pack(p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)))

        structured = self.structured_replies()
        if structured and meta_contexts:
            self.meta_contexts(meta_contexts)
        self.go(no_zeroes)
        return Negotiated(self.size, self.transmission_flags, self.block_size, structured, self.contexts)

    # -- options -------------------------------------------------------------------------------

    def option(self, option: int, data: bytes = b"") -> None:
        self.wire.send(p.encode_option(option, data))

    def reply(self, option: int) -> tuple[int, bytes]:
        head = self.wire.recv_bytes(p.OPTION_REPLY_HEAD.size)
        magic, echoed, reply, length = p.OPTION_REPLY_HEAD.unpack(head)
        if magic != p.OPTION_REPLY_MAGIC:
            raise NbdError(f"{self.where} sent an option reply with bad magic 0x{magic:016x}")
        if echoed != option:
            raise NbdError(f"{self.where} answered option {option} as if it were option {echoed}")
        if length > p.MAX_OPTION_REPLY:
            raise NbdError(f"{self.where} sent an oversized option reply ({length} bytes)")
        return reply, self.wire.recv_bytes(length) if length else b""

    def refused(self, what: str, reply: int, data: bytes) -> NbdError:
        if reply == p.REP_ERR_TLS_REQD:
            return NbdError(
                f"{self.where} requires TLS, which Hozon's NBD client does not speak",
                hint="serve the disk without TLS on a unix socket or a trusted network",
            )
        if reply == p.REP_ERR_UNKNOWN:
            return NbdError(f"{self.where} has no export named {self.export!r}")
        reason = p.OPTION_REPLY_ERRORS.get(reply, f"error reply {reply:#x}")
        message = p.server_text(data) if data else ""
        return NbdError(f"{self.where} refused {what}: {reason}" + (f" ({message})" if message else ""))

    def structured_replies(self) -> bool:
        self.option(p.OPT_STRUCTURED_REPLY)
        reply, data = self.reply(p.OPT_STRUCTURED_REPLY)
        if reply == p.REP_ACK:
            return True
        if reply in (p.REP_ERR_TLS_REQD, p.REP_ERR_SHUTDOWN):
            raise self.refused("structured replies", reply, data)
        if reply & p.REP_FLAG_ERROR:
            return False  # an old server: simple replies only, and no metadata contexts
        raise NbdError(f"{self.where} answered the structured reply option with reply type {reply}")

    def meta_contexts(self, queries: tuple[str, ...]) -> None:
        self.option(p.OPT_SET_META_CONTEXT, p.encode_meta_context_query(self.export, queries))
        while True:
            reply, data = self.reply(p.OPT_SET_META_CONTEXT)
            if reply == p.REP_ACK:
                return
            if reply == p.REP_META_CONTEXT:
                if len(data) < 5:
                    raise NbdError(f"{self.where} sent a malformed metadata context reply")
                (context_id,) = p.U32.unpack_from(data)
                self.contexts[data[4:].decode("utf-8", "replace")] = context_id
            elif reply == p.REP_ERR_UNSUP:
                self.contexts.clear()
                return
            elif reply & p.REP_FLAG_ERROR:
                raise self.refused("the metadata contexts " + ", ".join(queries), reply, data)
            else:
                raise NbdError(f"{self.where} answered the metadata context option with reply type {reply}")

    def go(self, no_zeroes: bool) -> None:
        self.option(p.OPT_GO, p.encode_go(self.export, (p.INFO_BLOCK_SIZE,)))
        have_export = False
        while True:
            reply, data = self.reply(p.OPT_GO)
            if reply == p.REP_INFO:
                have_export |= self.info(data)
            elif reply == p.REP_ACK:
                if not have_export:
                    raise NbdError(f"{self.where} accepted export {self.export!r} without telling its size")
                return
            elif reply == p.REP_ERR_UNSUP and not have_export:
                self.export_name(no_zeroes)  # a server from before NBD_OPT_GO
                return
            elif reply & p.REP_FLAG_ERROR:
                raise self.refused(f"export {self.export!r}", reply, data)
            else:
                raise NbdError(f"{self.where} answered NBD_OPT_GO with reply type {reply}")

    def info(self, data: bytes) -> bool:
        """Take in one NBD_REP_INFO; True if it was the export's size and flags."""
        if len(data) < 2:
            raise NbdError(f"{self.where} sent a malformed export information reply")
        (info,) = p.U16.unpack_from(data)
        if info == p.INFO_EXPORT:
            if len(data) != p.EXPORT_INFO.size:
                raise NbdError(f"{self.where} sent a malformed export size reply")
            _, self.size, self.transmission_flags = p.EXPORT_INFO.unpack(data)
            return True
        if info == p.INFO_BLOCK_SIZE:
            if len(data) != p.BLOCK_SIZE_INFO.size:
                raise NbdError(f"{self.where} sent a malformed block size reply")
            _, minimum, preferred, maximum = p.BLOCK_SIZE_INFO.unpack(data)
            if not (_power_of_two(minimum) and minimum <= 65536 and _power_of_two(preferred) and maximum >= minimum):
                raise NbdError(
                    f"{self.where} sent impossible block sizes "
                    f"(minimum {minimum}, preferred {preferred}, maximum {maximum})"
                )
            self.block_size = BlockSize(minimum, preferred, maximum)
        return False  # names, descriptions and unknown kinds of information are ignored

    def export_name(self, no_zeroes: bool) -> None:
        self.option(p.OPT_EXPORT_NAME, self.export.encode("utf-8"))
        try:
            data = self.wire.recv_bytes(p.EXPORT_NAME_REPLY.size, first=True)
        except NbdError as exc:
            raise NbdError(f"{self.where} refused export {self.export!r} (it closed the connection)") from exc
        self.size, self.transmission_flags = p.EXPORT_NAME_REPLY.unpack(data)
        if not no_zeroes:
            self.wire.recv_bytes(124)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
