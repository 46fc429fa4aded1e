"""The server's log: one JSON object a line on standard error (journald keeps it; shippers parse it).

Three kinds of line share one shape (``time``, ``level``, ``logger``, ``message`` and fields): the
server's own events (``hozon.server``: every run event also written to the run's log in the catalog,
with ``run``), HTTP requests (``uvicorn.access``: ``client``, ``method``, ``path``, ``status``; never
a credential, which travels in a header), and uvicorn's own messages.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

FIELDS = ("run", "job", "agent", "namespace")
_ACCESS = ("client", "method", "path", "http", "status")  # uvicorn.access's message arguments, in order


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == len(_ACCESS):
            doc["message"] = "request"
            doc.update(zip(_ACCESS, record.args, strict=True))
        else:
            doc["message"] = record.getMessage()
        doc.update((key, getattr(record, key)) for key in FIELDS if hasattr(record, key))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: int = logging.INFO) -> None:
    """Send the server's and uvicorn's records, as JSON lines, to standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    for name in ("hozon", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
