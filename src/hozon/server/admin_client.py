"""Admin commands talking to a running server: its URL, CA and admin credential read from its directory.

On the server host ``--dir DIR`` is all an admin command needs; the request goes over HTTPS to the
running ``hozon server run`` like any other client's, so the API stays the one way in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from hozon import https
from hozon.errors import ServerError
from hozon.server.paths import ServerDir
from hozon.server.setup import server_url


class AdminClient:
    def __init__(self, url: str, ca_file: Path, token: str) -> None:
        self.url = url
        self._client = https.client(url, ca_file, token)

    @classmethod
    def from_dir(cls, directory: Path) -> AdminClient:
        server_dir = ServerDir(directory)
        settings = server_dir.load_settings()
        return cls(server_url(settings), server_dir.ca_cert, server_dir.admin_token.read_text().strip())

    def request(self, method: str, path: str, doing: str, **kwargs: Any) -> httpx.Response:
        """``doing`` completes "the server refused to …" when the server says no."""
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            error = https.unreachable(self.url, exc)
            raise ServerError(error.message, hint=error.hint or "is it running? start it with: hozon server run") \
                from exc
        return https.check(response, doing)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()
