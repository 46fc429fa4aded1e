"""Progress for scripts with --json: one JSON object per line on stderr (restic's backup messages).

    {"message_type": "status", "percent_done": 0.42, "total_files": …, "files_done": …,
     "total_bytes": …, "bytes_done": …, "current_files": ["/home/a/b"]}
    {"message_type": "error", "error": {"message": "/home/a/c: Permission denied"}, "during": "backup"}

Status lines come at most once a second; the result stays one JSON document on stdout.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

INTERVAL = 1.0  # seconds between status lines


class JsonStatus:
    """Writes status and error lines to stderr; safe to call from several threads."""

    def __init__(self, during: str) -> None:
        self.during = during
        self._lock = threading.Lock()
        self._last = 0.0

    def status(self, *, files_done: int, total_files: int, bytes_done: int, total_bytes: int,
               current: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < INTERVAL:
                return
            self._last = now
        percent = min(1.0, bytes_done / total_bytes) if total_bytes else 0.0
        self._write({"message_type": "status", "percent_done": round(percent, 4), "total_files": total_files,
                     "files_done": files_done, "total_bytes": total_bytes, "bytes_done": bytes_done,
                     "current_files": [c for c in current if c]})

    def error(self, message: str) -> None:
        self._write({"message_type": "error", "error": {"message": message}, "during": self.during})

    def _write(self, doc: dict[str, Any]) -> None:
        with self._lock:
            sys.stderr.write(json.dumps(doc) + "\n")
            sys.stderr.flush()
