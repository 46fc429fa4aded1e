"""The in-memory backend carries a whole repository: packs uploaded by several threads at once."""

from __future__ import annotations

import os
import threading

import pytest

from hozon.errors import ObjectNotFound
from hozon.repo import pack
from hozon.repo.backends.mem import MemoryBackend
from hozon.repo.pack import DATA
from hozon.repo.repository import Repository
from hozon.repo.writer import PACKS_PER_INDEX_FILE, BlobWriter


class SlowPuts(MemoryBackend):
    """Counts how many puts run at once (a network backend's puts overlap)."""

    uploaders = 4

    def __init__(self) -> None:
        super().__init__()
        self.running = self.most = 0
        self._count = threading.Lock()

    def put(self, key: str, data: bytes | memoryview) -> None:
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        threading.Event().wait(0.02)
        super().put(key, data)
        with self._count:
            self.running -= 1


def test_parallel_uploads_index_only_stored_packs_and_every_blob_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack, "TARGET_PACK_SIZE", 4096)  # a pack every few blobs
    backend = SlowPuts()
    repo = Repository.init(backend, "pw")
    repo.load_index()
    blobs = [os.urandom(3000) for _ in range(3 * PACKS_PER_INDEX_FILE * 4)]
    with BlobWriter(repo) as writer:
        ids = [writer.submit(blob, DATA) for blob in blobs]
    assert backend.most > 1  # uploads overlapped
    reopened = Repository.open(backend, "pw")
    reopened.load_index()
    packs = {e.key.rsplit("/", 1)[-1] for e in backend.list("data")}
    assert set(reopened.index.packs) == packs
    assert [reopened.load_blob(f.result()) for f in ids] == blobs
    with pytest.raises(ObjectNotFound):
        backend.get("snapshots/none")
