"""Pack files: many sealed blobs in one write-once file, named by the BLAKE3 hash of its bytes.

    pack   = blob* header_sealed header_length:u32le
    header = (type:u8 id:32 length:u32le raw_length:u32le)*     offsets follow from the order

The header repeats what the index says, so a lost index can be rebuilt from the packs alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hozon.crypto import AuthenticationFailed, BlobCipher, content_name
from hozon.errors import CorruptData

DATA = 0
TREE = 1
MAP = 2  # a disk image's chunk ids (see repo/imagemap.py)
BLOB_TYPES = {DATA: "data", TREE: "tree", MAP: "map"}

_ENTRY = struct.Struct("<B32sII")
HEADER_AAD = b"pack-header"
TARGET_PACK_SIZE = 16 * 1024 * 1024


def pack_key(name: str) -> str:
    return f"data/{name[:2]}/{name}"


def blob_aad(blob_type: int, blob_id: bytes) -> bytes:
    return bytes((blob_type,)) + blob_id


@dataclass(frozen=True)
class PackEntry:
    blob_type: int
    blob_id: bytes
    offset: int
    length: int
    raw_length: int


class PackBuilder:
    """Collects sealed blobs until the pack is big enough, then ``finish`` gives its name and bytes."""

    def __init__(self, cipher: BlobCipher) -> None:
        self._cipher = cipher
        self._parts: list[bytes] = []
        self.entries: list[PackEntry] = []
        self.size = 0

    def add(self, blob_type: int, blob_id: bytes, sealed: bytes, raw_length: int) -> None:
        self.entries.append(PackEntry(blob_type, blob_id, self.size, len(sealed), raw_length))
        self._parts.append(sealed)
        self.size += len(sealed)

    def full(self) -> bool:
        return self.size >= TARGET_PACK_SIZE

    def finish(self) -> tuple[str, bytes]:
        header = b"".join(_ENTRY.pack(e.blob_type, e.blob_id, e.length, e.raw_length) for e in self.entries)
        sealed_header = self._cipher.seal(header, HEADER_AAD)
        self._parts.append(sealed_header)
        self._parts.append(struct.pack("<I", len(sealed_header)))
        data = b"".join(self._parts)
        self._parts = []
        return content_name(data), data


def read_header(cipher: BlobCipher, key: str, tail: bytes, pack_size: int) -> list[PackEntry]:
    """Parse a pack's header from its last bytes (``tail`` must hold the whole sealed header)."""
    if len(tail) < 4:
        raise CorruptData(key, "file too short to be a pack")
    (hlen,) = struct.unpack("<I", tail[-4:])
    if hlen + 4 > len(tail) or hlen + 4 > pack_size:
        raise CorruptData(key, "pack header length is out of range (truncated file?)")
    try:
        header = cipher.open(tail[-4 - hlen : -4], HEADER_AAD)
    except AuthenticationFailed as exc:
        raise CorruptData(key, f"pack header does not authenticate ({exc})") from exc
    if len(header) % _ENTRY.size:
        raise CorruptData(key, "pack header has a partial entry")
    entries: list[PackEntry] = []
    offset = 0
    for blob_type, blob_id, length, raw_length in _ENTRY.iter_unpack(header):
        entries.append(PackEntry(blob_type, blob_id, offset, length, raw_length))
        offset += length
    if offset + hlen + 4 != pack_size:
        raise CorruptData(key, "pack header does not match the file size")
    return entries

