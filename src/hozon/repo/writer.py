"""Storing blobs: hash, deduplicate, compress and seal on worker threads, then pack and upload.

    caller ──submit(data)──► workers (keyed BLAKE3 → dedup → zstd → AES-GCM) ──► pack builder
                                                                                   │ full pack
    index file ◄── every few packs ◄── index entries ◄── uploader threads ◄────────┘

The heavy steps release the GIL, so two cores work at once. Queues are bounded (memory stays flat)
and a worker or upload error is raised to the caller at its next call. Index entries are written
only after the packs they name are stored: packs → index → snapshot. There are as many uploader
threads as the backend says it gains from (``Backend.uploaders``: one for a local disk).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hozon import compress
from hozon.repo.index import ENTRY_DTYPE, PackRecord
from hozon.repo.pack import PackBuilder, PackEntry, blob_aad, pack_key
from hozon.repo.repository import Repository

PACKS_PER_INDEX_FILE = 8
T = TypeVar("T")
_STOP = object()


def pack_record(name: str, entries: list[PackEntry]) -> PackRecord:
    """How an index file lists pack ``name`` holding ``entries``."""
    rows = np.zeros(len(entries), ENTRY_DTYPE)
    for row, e in zip(rows, entries, strict=True):
        row["type"], row["id"], row["offset"] = e.blob_type, e.blob_id, e.offset
        row["length"], row["raw_length"] = e.length, e.raw_length
    return PackRecord(name, rows)


@dataclass
class WriteStats:
    blobs_new: int = 0
    bytes_new: int = 0  # plaintext bytes of new blobs
    bytes_stored: int = 0  # sealed bytes of new blobs


class BlobWriter:
    """Use as a context manager; ``close()`` flushes the last pack and index before returning.

    ``dry_run``: blobs are hashed, deduplicated, compressed and sealed (so the stats say what would
    be added) but nothing is written. ``compression_level`` None: payloads kept raw.
    """

    def __init__(self, repo: Repository, workers: int | None = None,
                 compression_level: int | None = compress.DEFAULT_LEVEL, dry_run: bool = False) -> None:
        self.repo = repo
        self.stats = WriteStats()
        self._level = compression_level
        self._dry_run = dry_run
        self._workers = workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="hozon-blob")
        self._slots = threading.BoundedSemaphore(self._workers * 3)
        self._lock = threading.Lock()
        self._in_flight: set[bytes] = set()
        self._builder = PackBuilder(repo.cipher)
        uploaders = max(1, repo.backend.uploaders)
        self._uploads: queue.Queue[object] = queue.Queue(maxsize=uploaders)
        self._pending_records: list[PackRecord] = []
        self._records_lock = threading.Lock()
        self._error: BaseException | None = None
        self._uploaders = [threading.Thread(target=self._upload_loop, name=f"hozon-upload-{n}", daemon=True)
                           for n in range(uploaders)]
        for thread in self._uploaders:
            thread.start()
        self._closed = False

    # -- public ---------------------------------------------------------------------------------
    def submit(self, data: bytes, blob_type: int) -> Future[bytes]:
        """Store ``data`` unless the repository has it; the future gives its id."""
        return self.run(self.store_blob, data, blob_type)

    def run(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``task`` on a worker (it may call ``store_blob``); blocks while all slots are busy."""
        self._raise_pending_error()
        self._slots.acquire()
        future = self._pool.submit(task, *args)
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    def store(self, data: bytes, blob_type: int) -> bytes:
        """Synchronous ``submit`` (for tree blobs, which are small)."""
        return self.submit(data, blob_type).result()

    def close(self) -> None:
        """Upload what is left and write the final index file; raises the first error seen."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._error is None and self._builder.entries:
            self._queue_pack(self._builder)
        self._stop_uploaders()
        if self._error is None and self._pending_records:
            self.repo.write_index(self._pending_records)
            self._pending_records = []
        self._raise_pending_error()

    def abort(self) -> None:
        """Stop without writing anything more (stored packs stay, as garbage or for reuse)."""
        self._error = self._error or RuntimeError("aborted")
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stop_uploaders()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- workers --------------------------------------------------------------------------------
    def store_blob(self, data: bytes, blob_type: int) -> bytes:
        """Hash, deduplicate, compress, seal and pack one blob (on the calling thread); its id."""
        blob_id = self.repo.master.chunk_id(data)
        with self._lock:
            if blob_id in self._in_flight or self.repo.index.has_live(blob_id):
                return blob_id
            self._in_flight.add(blob_id)
        sealed = self.repo.cipher.seal(compress.compress(data, self._level), blob_aad(blob_type, blob_id))
        full: PackBuilder | None = None
        with self._lock:
            self.stats.blobs_new += 1
            self.stats.bytes_new += len(data)
            self.stats.bytes_stored += len(sealed)
            if self._dry_run:  # counted, and deduplicated from now on (still in flight), but never written
                return blob_id
            self._builder.add(blob_type, blob_id, sealed, len(data))
            if self._builder.full():
                full, self._builder = self._builder, PackBuilder(self.repo.cipher)
        if full is not None:
            self._queue_pack(full)
        return blob_id

    def _queue_pack(self, builder: PackBuilder) -> None:
        while True:
            self._raise_pending_error()
            try:
                self._uploads.put(builder, timeout=0.5)
                return
            except queue.Full:
                continue

    def _stop_uploaders(self) -> None:
        for _thread in self._uploaders:
            self._uploads.put(_STOP)
        for thread in self._uploaders:
            thread.join()

    def _upload_loop(self) -> None:
        while True:
            item = self._uploads.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain so producers never block on a dead uploader
            assert isinstance(item, PackBuilder)
            try:
                self._upload(item)
            except BaseException as exc:
                self._error = exc

    def _upload(self, builder: PackBuilder) -> None:
        name, data = builder.finish()
        self.repo.backend.put(pack_key(name), data)
        with self._lock:
            for e in builder.entries:
                self.repo.index.add(e.blob_id, name, e.offset, e.length, e.blob_type)
                self._in_flight.discard(e.blob_id)
        with self._records_lock:  # one index file at a time, naming only packs already stored
            self._pending_records.append(pack_record(name, builder.entries))
            if len(self._pending_records) >= PACKS_PER_INDEX_FILE:
                self.repo.write_index(self._pending_records)
                self._pending_records = []

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error
