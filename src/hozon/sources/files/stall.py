"""Naming a file whose read waits too long: a stalled network file system, an offline (HSM) file.

A read blocked in the kernel cannot be taken back, so the wait is not bounded; what is bounded is
how long the user waits without knowing on which file: once one read has waited ``after`` seconds,
``notify`` gets a warning naming the file, while the read still waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hozon.chunking import Readable


class StallWatch:
    """Watches the reads made inside ``reading()`` on any thread; ``close()`` stops it."""

    def __init__(self, after: float, notify: Callable[[str], None]) -> None:
        self.after = after
        self._notify = notify
        self._reads: dict[int, tuple[str, float]] = {}  # thread → (path, when its read began)
        self._named: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hozon-stall-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def reading(self, path: str) -> Iterator[None]:
        """Around one read system call (or a few) of ``path``."""
        me = threading.get_ident()
        self._reads[me] = (path, time.monotonic())
        try:
            yield
        finally:
            del self._reads[me]

    def watched(self, path: str, raw: Readable) -> Readable:
        """``raw`` with each ``readinto`` watched."""
        return _Watched(self, path, raw)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.after / 4)):
            now = time.monotonic()
            for path, began in list(self._reads.values()):
                if now - began >= self.after and path not in self._named:
                    self._named.add(path)
                    self._notify(f"{path}: a read had no answer from its file system for {self.after:g} s; "
                                 "still waiting")


class _Watched:
    def __init__(self, watch: StallWatch, path: str, raw: Readable) -> None:
        self._watch, self._path, self._raw = watch, path, raw

    def readinto(self, buffer: memoryview) -> int:
        with self._watch.reading(self._path):
            return self._raw.readinto(buffer)
