"""The agent's side of the agent protocol (docs/server.md, "The agent protocol"), over pinned HTTPS.

Poll for a run, report its progress and log lines, finish it. Every failure is a ``ServerError``
whose ``status`` tells the daemon what to do: 0 (no answer) or 5xx, the server is away (try again
later); 401, the credential is unknown or revoked (stop); 409, the run is no longer this agent's
(stop working on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from hozon import https
from hozon.agent.config import AgentConfig
from hozon.errors import ServerError

POLL_WAIT = 25.0  # seconds the server may hold a poll open
POLL_TIMEOUT = httpx.Timeout(POLL_WAIT + 30.0, connect=15.0)
MAX_LOG_LINES = 1000  # per request, the server's limit


@dataclass(frozen=True)
class Assignment:
    """A run the server handed to this agent, with its job."""

    run_id: int
    job: str
    kind: str
    namespace: str
    spec: dict[str, Any]
    lease_seconds: float

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Assignment:
        job = doc["job"]
        return cls(int(doc["id"]), str(job["name"]), str(job["kind"]), str(job["namespace"]), dict(job["spec"]),
                   float(doc.get("lease_seconds") or 60))


def transient(exc: ServerError) -> bool:
    """Whether a failure means "the server is away for now" (worth trying again) rather than a refusal."""
    return exc.status == 0 or exc.status >= 500


class AgentClient:
    """One HTTPS connection pool to the server, trusting only the CA pinned at enrolment."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._http = https.client(config.url, config.ca_file, config.secret)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def poll(self, wait: float = POLL_WAIT) -> Assignment | None:
        """The next run of this agent's jobs (now running and held by it), or None after ``wait`` seconds."""
        response = self._post("/api/v1/agent/poll", {"wait": wait}, "hand out a run", timeout=POLL_TIMEOUT)
        return Assignment.from_doc(response.json()) if response.status_code == 200 else None

    def progress(self, run_id: int, doc: dict[str, Any]) -> None:
        """Report how far the run is; this renews its lease."""
        self._post(f"/api/v1/agent/runs/{run_id}/progress", doc, f"take the progress of run {run_id}")

    def log(self, run_id: int, lines: list[str]) -> None:
        for start in range(0, len(lines), MAX_LOG_LINES):
            self._post(f"/api/v1/agent/runs/{run_id}/log", {"lines": lines[start:start + MAX_LOG_LINES]},
                       f"take the log of run {run_id}")

    def finish(self, run_id: int, doc: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self._post(f"/api/v1/agent/runs/{run_id}/finish", doc,
                                            f"record the end of run {run_id}").json()
        return answer

    def _post(self, path: str, body: dict[str, Any], doing: str,
              timeout: httpx.Timeout | None = None) -> httpx.Response:
        try:
            response = self._http.post(path, json=body, timeout=timeout or https.TIMEOUT)
        except httpx.TransportError as exc:
            raise https.unreachable(self.config.url, exc) from exc
        return https.check(response, doing)
