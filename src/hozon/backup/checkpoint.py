"""What a checkpoint adds to an image backup: the VM's state stream, stored, and what it needs to resume.

A checkpoint is an image snapshot (kind ``checkpoint``) whose disks were captured exactly as a
``vm`` snapshot's are (``backup_vm``), at the instant QEMU saved the VM's CPU, memory and device
state (``hozon.sources.qemu.vmstate``). The state stream is cut by content (FastCDC, the
repository's seed), so a second checkpoint of a mostly idle VM stores little more than the pages
that changed, wherever they moved in the stream. Its chunk ids go into map blobs like a disk's
(``extra["state"]["maps"]``), its chunk lengths into the snapshot (for ``hozon diff``).

A checkpoint only resumes on a QEMU that accepts the stream: the same machine type, the same
devices, a QEMU no older. So the snapshot also records the machine type, the QEMU version and
binary, the memory size and the network interfaces, which ``hozon vm checkpoint restore`` checks
before it resumes anything.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from hozon.chunking import ContentChunker, Readable
from hozon.errors import HozonError, QmpCommandError
from hozon.repo.imagemap import encode_map, split_maps
from hozon.repo.pack import DATA, MAP
from hozon.repo.writer import BlobWriter
from hozon.sources.qemu.qmp import QmpClient

STATE_FORMAT = "qemu-migration"  # the stream as QEMU's migration writes it (background-snapshot)
STATE_CHUNK_AVERAGE = 64 * 1024  # a guest dirties pages all over its memory: small chunks keep the rest shared
MAX_IN_FLIGHT = 32


@dataclass(frozen=True)
class StoredStream:
    ids: bytes  # 32 bytes per chunk, in stream order
    lengths: list[int]


def state_consumer(writer: BlobWriter, seed: int,
                   progress: Callable[[int], None]) -> Callable[[Readable], StoredStream]:
    """What reads the state stream (on StateCapture's thread): cut it by content and store every chunk."""

    def consume(stream: Readable) -> StoredStream:
        futures: list[Future[bytes]] = []
        lengths: list[int] = []
        ids = bytearray()
        try:
            for chunk in ContentChunker(seed, STATE_CHUNK_AVERAGE).chunks(stream):
                lengths.append(len(chunk))
                futures.append(writer.submit(chunk, DATA))
                progress(len(chunk))
                if len(futures) >= MAX_IN_FLIGHT:
                    ids += b"".join(f.result() for f in futures)
                    futures.clear()
            ids += b"".join(f.result() for f in futures)
        except OSError as exc:
            raise HozonError(f"reading the VM's state stream failed: {exc.strerror or exc}") from None
        return StoredStream(bytes(ids), lengths)

    return consume


def state_doc(writer: BlobWriter, stored: StoredStream, migration: dict[str, Any]) -> dict[str, Any]:
    """The snapshot's ``state``: the stream's map blobs (stored now), chunk lengths, QEMU's figures."""
    table = np.frombuffer(stored.ids, np.uint8).reshape(-1, 32)
    maps = [writer.store_blob(encode_map(part), MAP).hex() for part in split_maps(table)]
    return {
        "format": STATE_FORMAT, "size": sum(stored.lengths), "chunks": len(stored.lengths), "maps": maps,
        "lengths": base64.b64encode(np.asarray(stored.lengths, "<u4").tobytes()).decode(),
        "ram_bytes": int(migration.get("ram", {}).get("total", 0)),
        "downtime_ms": migration.get("downtime"),
    }


def describe_vm(qmp: QmpClient, vm_config: str | None) -> dict[str, Any]:
    """What a resume must match: machine type, QEMU binary and version, memory, CPUs, network interfaces."""
    machine = _ask(qmp, "qom-get", {"path": "/machine", "property": "type"})
    memory = _ask(qmp, "query-memory-size-summary")
    cpus = _ask(qmp, "query-cpus-fast")
    nics = _ask(qmp, "query-rx-filter")
    interfaces = [{"name": n.get("name"), "mac": n.get("main-mac")} for n in nics or [] if isinstance(n, dict)]
    argv = shlex.split(vm_config) if vm_config else []
    backends = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-netdev", "-nic")]
    described = {
        "machine": str(machine).removesuffix("-machine") if machine else None,
        "memory_bytes": memory.get("base-memory") if isinstance(memory, dict) else None,
        "cpus": len(cpus) if isinstance(cpus, list) else None,
        "interfaces": interfaces,
        "netdevs": backends,
    }
    if argv:  # a libvirt source names the binary itself (its <emulator>)
        described["qemu_binary"] = argv[0]
    return described


def _ask(qmp: QmpClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """A description QEMU may not give (older QEMU, no NIC): None rather than no checkpoint."""
    try:
        return qmp.execute(command, arguments)
    except QmpCommandError:
        return None
