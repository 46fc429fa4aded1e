"""Enrolled agents of a test server (tests/hozon_server.py), made with the real commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
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


@dataclass
class AgentProcess:
    """A real ``hozon agent run`` process; its log (stdout and stderr) in ``log``."""

    agent: Agent
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit (killed after ``timeout``); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_agent(agent: Agent, *args: str, env: dict[str, str] | None = None) -> AgentProcess:
    """``hozon agent run --dir AGENT_DIR`` in the background (stop it, or use ``running_agents``)."""
    log = agent.directory.parent / f"{agent.name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hozon", "agent", "run", "--dir", str(agent.directory), *args],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    return AgentProcess(agent, proc, log)


@contextlib.contextmanager
def running_agents(*agents: Agent, args: tuple[str, ...] = ()) -> Iterator[list[AgentProcess]]:
    """Agent processes for ``agents``, killed at the end if still running."""
    started = [start_agent(a, *args) for a in agents]
    try:
        yield started
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
