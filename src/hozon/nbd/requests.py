"""The client's requests in flight: what each sent, and what its reply has delivered so far.

Internal to :mod:`hozon.nbd.client`; kept apart so the client reads as the protocol's verbs.
"""

from __future__ import annotations


class Command:
    """One request on the wire and what its reply has delivered so far."""

    __slots__ = (
        "data",
        "done",
        "error",
        "flags",
        "group",
        "kind",
        "length",
        "offset",
        "payload",
        "pieces",
        "received",
        "status",
        "view",
    )

    def __init__(
        self,
        kind: int,
        offset: int,
        length: int,
        view: memoryview | None = None,
        flags: int = 0,
        payload: memoryview | None = None,
    ) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.flags = flags
        self.payload = payload  # what a write sends after its request header
        # A read's bytes land in ``view`` (view[0] is the byte at ``offset``), which is allocated
        # only when needed: a reply that is one data chunk is received straight into ``data``.
        self.view = view
        self.data: bytes | None = None
        self.received = 0
        self.pieces: list[tuple[int, int]] = []  # (start, length) of content chunks, for multi-chunk replies
        self.status: dict[int, list[tuple[int, int]]] = {}
        self.error: tuple[int, str] | None = None
        self.done = False
        self.group: ReadGroup | None = None


class ReadGroup:
    """One caller-level read: a single command, or several sharing ``buffer``; done with its last."""

    __slots__ = ("buffer", "command", "length", "offset", "skip")

    def __init__(self, offset: int, length: int, skip: int, buffer: bytearray | None) -> None:
        self.offset = offset
        self.length = length
        self.skip = skip  # bytes read before ``offset`` only to honour the minimum block size
        self.buffer = buffer
        self.command: Command | None = None

    def result(self) -> bytes:
        raw: bytes | memoryview
        if self.buffer is not None:
            raw = memoryview(self.buffer)
        elif self.command is not None and self.command.data is not None:
            raw = self.command.data
        elif self.command is not None and self.command.view is not None:
            raw = self.command.view
        else:
            return b""
        if isinstance(raw, bytes) and self.skip == 0 and len(raw) == self.length:
            return raw  # the common case: the bytes as received, never copied
        return bytes(raw[self.skip : self.skip + self.length])
