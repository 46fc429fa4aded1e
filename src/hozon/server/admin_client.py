"""The admin side of the API over HTTPS: what ``hozon job …`` (and other admin commands) speak.

On the server host ``--dir DIR`` is enough: the URL comes from DIR/server.json, the credential from
DIR/admin.token and the CA to trust from DIR/tls/ca.pem. Elsewhere, ``--server URL`` with the
credential in ``HOZON_SERVER_TOKEN`` and a copy of the server's CA certificate (``--ca FILE``),
optionally checked against the fingerprint ``server init`` printed. Only that CA is trusted. Every
refusal becomes one sentence: the server's own ``detail``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from hozon import https
from hozon.errors import ServerError, UsageError
from hozon.server import pki
from hozon.server.paths import ServerDir


class AdminClient:
    def __init__(self, url: str, token: str, ca_file: Path) -> None:
        self.url = url.rstrip("/")
        self._http = https.client(self.url, ca_file, token)

    @classmethod
    def connect(cls, directory: Path | None, server: str | None, ca: Path | None,
                fingerprint: str | None) -> AdminClient:
        """From ``--dir`` on the server host, or ``--server`` + ``HOZON_SERVER_TOKEN`` + ``--ca`` elsewhere."""
        if directory is not None:
            from hozon.server.setup import server_url  # (it imports the catalog's migrations)

            server_dir = ServerDir(directory)
            settings = server_dir.load_settings()
            token = server_dir.admin_token.read_text().strip()
            return cls(server or server_url(settings), token, ca or server_dir.ca_cert)
        if not server:
            raise UsageError("no server given", hint="on the server host pass --dir DIR; elsewhere --server URL "
                                                     "with HOZON_SERVER_TOKEN and --ca FILE")
        token = os.environ.get("HOZON_SERVER_TOKEN", "").strip()
        if not token:
            raise UsageError("HOZON_SERVER_TOKEN is not set", hint="put the admin credential (DIR/admin.token) in it")
        if ca is None:
            raise UsageError("--server needs the server's CA certificate",
                             hint="copy DIR/tls/ca.pem from the server host and pass --ca FILE")
        try:
            pem = ca.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read the CA certificate {ca}: {exc.strerror}") from exc
        if fingerprint and pki.fingerprint(pem) != pki.normalise_fingerprint(fingerprint):
            raise UsageError(f"the CA certificate {ca} does not have the fingerprint {fingerprint}",
                             hint="compare it with the fingerprint hozon server init printed")
        return cls(server, token, ca)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """One API request; the decoded JSON answer (None for 204), or a typed error."""
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise https.unreachable(self.url, exc) from exc
        if response.status_code >= 400:
            raise _error(response)
        return response.json() if response.status_code != 204 and response.content else None


def _error(response: httpx.Response) -> UsageError | ServerError:
    """The server's one-sentence ``detail`` as the matching error (400/422: the request was wrong)."""
    try:
        doc = response.json()
    except ValueError:
        doc = {}
    detail: Any = doc.get("detail") if isinstance(doc, dict) else None
    hint = doc.get("hint") if isinstance(doc, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    message = str(detail or f"the server answered {response.status_code} {response.reason_phrase}")
    if response.status_code == 401:
        return ServerError(f"the server refused the credential: {message}", 401,
                           hint="on the server host use --dir DIR; elsewhere set HOZON_SERVER_TOKEN")
    if response.status_code in (400, 422):
        return UsageError(message, hint=hint)
    return ServerError(message, response.status_code, hint=hint)
