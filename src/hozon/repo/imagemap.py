"""Disk images in a snapshot: for every disk, the id of each fixed-size chunk, in disk order.

An image snapshot (kind ``vm`` or ``checkpoint``) has no file tree. Its ``extra["disks"]`` lists
the disks; each names the *map blobs* (blob type ``map``) that hold its chunk ids: 32 bytes per
chunk of ``chunk_size`` bytes, the chunk at disk offset ``i * chunk_size`` being entry ``i``. A
chunk that reads as zeros has the id ZERO_ID and is stored nowhere, so every snapshot lists the
whole disk (logically full) while zero regions cost nothing.

    extra["disks"] = [{"name": "vda", "size": virtual bytes, "chunk_size": 1048576,
                       "maps": [hex id, …], "format": "qcow2", …}]
    extra["state"] = {"format": "qemu-migration", "size": bytes, "maps": [hex id, …],
                      "lengths": base64 of little-endian uint32 chunk lengths, …}   (checkpoints)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from hozon.errors import CorruptData

ZERO_ID = bytes(32)
MAP_ENTRIES = 65536  # chunk ids per map blob (2 MiB): a 64 GiB disk at 1 MiB chunks per blob


def encode_map(ids: npt.NDArray[np.uint8]) -> bytes:
    """(n, 32) chunk ids → the bytes of one map blob."""
    return np.ascontiguousarray(ids, np.uint8).tobytes()


def decode_map(data: bytes, where: str) -> npt.NDArray[np.uint8]:
    if len(data) % 32:
        raise CorruptData(where, "a disk map blob has a partial entry")
    return np.frombuffer(data, np.uint8).reshape(-1, 32)


def zero_mask(ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which entries of a map are zero chunks (stored nowhere)."""
    mask: npt.NDArray[np.bool_] = ~np.any(ids, axis=1)
    return mask


def split_maps(ids: npt.NDArray[np.uint8]) -> Iterator[npt.NDArray[np.uint8]]:
    for start in range(0, max(len(ids), 1), MAP_ENTRIES):
        yield ids[start : start + MAP_ENTRIES]


def image_disks(extra: dict[str, Any]) -> list[dict[str, Any]]:
    disks = extra.get("disks", [])
    return disks if isinstance(disks, list) else []


def mapped_entries(extra: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of an image snapshot that names map blobs, with how messages call it: the disks
    (``disk vda``) and a checkpoint's state stream (``VM state``, ``extra["state"]``, whose chunks
    are cut by content and so vary in length)."""
    entries = [(f"disk {d.get('name', '?')}", d) for d in image_disks(extra) if isinstance(d, dict)]
    state = extra.get("state")
    if isinstance(state, dict):
        entries.append(("VM state", state))
    return entries


def map_ids(disk: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(m) for m in disk.get("maps", [])]
