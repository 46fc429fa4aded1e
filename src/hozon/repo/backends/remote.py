"""A repository kept by a Hozon server: ``hozon+https://HOST:PORT/NAMESPACE``.

The five storage verbs over HTTPS (the server's ``/api/v1/repo`` routes), as an enrolled agent:
its credential and the pinned CA come from the agent directory (``HOZON_AGENT_DIR``, or given).
Every verb is idempotent (files are write-once; a repeated put of the same bytes is accepted), so
transport failures are retried with back-off. A request waits on the network more than on either
end's disk, so packs are uploaded by several threads at once (``uploaders``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from hozon import https
from hozon.agent.config import AgentConfig
from hozon.errors import BackendError, HozonError, ObjectNotFound, RepositoryFull, UsageError
from hozon.repo.backends.base import Entry

SCHEME = "hozon+https"
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # then give up: about half a minute without the server
RETRY_STATUSES = {502, 503, 504}
PUT_PIECE = 1 << 20


class RemoteBackend:
    uploaders = 4

    def __init__(self, location: str, agent: AgentConfig | None = None) -> None:
        parts = urlsplit(location)
        namespace = parts.path.strip("/")
        if parts.scheme != SCHEME or not parts.hostname or not namespace or "/" in namespace:
            raise UsageError(f"{location!r} is not a server repository location",
                             hint="write it as hozon+https://HOST:PORT/NAMESPACE")
        self.location = location
        self.namespace = namespace
        self.agent = agent or AgentConfig.from_env()
        self.base_url = f"https://{parts.netloc}"
        self._client = https.client(self.base_url, self.agent.ca_file, self.agent.secret)
        self._prefix = f"/api/v1/repo/{quote(namespace, safe='')}"

    @classmethod
    def from_location(cls, location: str) -> RemoteBackend:
        return cls(location)

    @property
    def password(self) -> str:
        """The namespace's repository password the agent received at enrolment."""
        return self.agent.password

    def put(self, key: str, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")

        def pieces() -> Iterator[bytes]:
            for start in range(0, len(view), PUT_PIECE):
                yield bytes(view[start:start + PUT_PIECE])

        self._request("PUT", self._object(key), key, content_factory=pieces,
                      headers={"content-length": str(len(view)), "content-type": "application/octet-stream"})

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        headers = {}
        if offset or length is not None:
            if length == 0:
                return b""
            last = "" if length is None else str(offset + length - 1)
            headers["range"] = f"bytes={offset}-{last}"
        response = self._request("GET", self._object(key), key, headers=headers, accept=frozenset({416}))
        return b"" if response.status_code == 416 else response.content

    def exists(self, key: str) -> bool:
        return self._request("HEAD", self._object(key), key, accept=frozenset({404})).status_code == 200

    def list(self, prefix: str) -> Iterator[Entry]:
        """Keys under ``prefix`` with their sizes in bytes, as the server lists them."""
        response = self._request("GET", f"{self._prefix}/list", prefix, params={"prefix": prefix.strip("/")})
        for line in response.text.splitlines():
            if line:
                doc = json.loads(line)
                yield Entry(doc["key"], int(doc["size"]))

    def delete(self, key: str) -> None:
        self._request("DELETE", self._object(key), key)

    def clean_uploads(self, max_age: float, dry_run: bool = False) -> int:
        """Nothing to do here: the server's own maintenance clears its namespaces' interrupted uploads."""
        return 0

    def close(self) -> None:
        self._client.close()

    def _object(self, key: str) -> str:
        return f"{self._prefix}/objects/{quote(key)}"

    def _request(self, method: str, url: str, key: str, *, accept: frozenset[int] = frozenset(),
                 content_factory: Callable[[], Iterator[bytes]] | None = None, **kwargs: Any) -> httpx.Response:
        """One request, retried on transport failures and gateway errors; a refusal becomes one sentence."""
        for delay in (*RETRY_DELAYS, None):
            try:
                content = content_factory() if content_factory is not None else None
                response = self._client.request(method, url, content=content, **kwargs)
            except httpx.TransportError as exc:
                if delay is None or "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise BackendError(https.unreachable(self.base_url, exc).message) from exc
                time.sleep(delay)
                continue
            if response.status_code in RETRY_STATUSES and delay is not None:
                time.sleep(delay)
                continue
            if response.is_success or response.status_code in accept:
                return response
            raise self._refusal(response, method, url, key)
        raise AssertionError("the last attempt returns or raises")

    def _refusal(self, response: httpx.Response, method: str, url: str, key: str) -> HozonError:
        reason = https.detail(response) if method != "HEAD" else _HEAD_REASONS.get(
            response.status_code, f"HTTP {response.status_code}")
        if response.status_code == 404 and "/objects/" in url:
            return ObjectNotFound(self.location, key)
        if response.status_code == 507:
            return RepositoryFull(f"{self.location}/{key}")
        return BackendError(f"{self.location}: the server refused to {_VERBS[method]} {key}: {reason}")


_VERBS = {"PUT": "store", "GET": "read", "HEAD": "look up", "DELETE": "delete"}
_HEAD_REASONS = {401: "unknown or revoked credential", 403: "this agent may not use that namespace"}
