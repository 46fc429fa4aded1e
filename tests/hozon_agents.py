"""Enrolled agents of a test server (tests/hozon_server.py), made with the real commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.hozon_server import RunningServer


@dataclass(frozen=True)
class Agent:
    directory: Path
    name: str
    namespace: str
    secret: str
    repo: str  # hozon+https://HOST:PORT/NS

    @property
    def env(self) -> dict[str, str]:
        """What the ordinary commands need to use the agent's repository on the server."""
        return {"HOZON_AGENT_DIR": str(self.directory), "HOZON_REPO": self.repo}


def token(server: RunningServer, namespace: str, expires: str = "1h") -> str:
    created = server.hozon("server", "token", "create", "--dir", str(server.directory), "--namespace", namespace,
                           "--expires", expires, "--json")
    doc = json.loads(created.stdout)
    assert doc["fingerprint"] == server.fingerprint and doc["url"] == server.url
    return str(doc["token"])


def enrol(server: RunningServer, directory: Path, namespace: str, name: str) -> Agent:
    server.hozon("agent", "enroll", server.url, "--token", token(server, namespace), "--dir", str(directory),
                 "--name", name)
    doc = json.loads((directory / "agent.json").read_text())
    return Agent(directory, name, namespace, doc["secret"],
                 f"hozon+https://{server.url.removeprefix('https://')}/{namespace}")


def server_side_env(server: RunningServer, namespace: str) -> dict[str, str]:
    """The namespace's repository opened directly on the server host (hozon server repo --env)."""
    exports = server.hozon("server", "repo", "--dir", str(server.directory), "--namespace", namespace, "--env")
    env: dict[str, str] = {"HOZON_AGENT_DIR": ""}
    for assignment in exports.stdout.removeprefix("export ").split():
        name, _, value = assignment.partition("=")
        env[name] = value
    return env
