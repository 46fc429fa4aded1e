"""The server's and the agent's systemd units start what they say: a server that answers over TLS,
and an agent that connects to it and carries out a job; both stop cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.hozon_agents import enrol
from tests.hozon_server import RunningServer, free_port
from tests.server_fixtures import wait_for
from tests.systemd_units import UNITS, start_unit, unit_environment

pytestmark = pytest.mark.timeout(300)


def test_the_server_and_agent_units_run_a_server_that_answers_and_an_agent_that_backs_up(tmp_path: Path) -> None:
    assert unit_environment("hozon-server.service") == {"HOZON_SERVER_DIR": "/var/lib/hozon-server"}
    assert unit_environment("hozon-agent.service") == {"HOZON_AGENT_DIR": "/var/lib/hozon-agent"}
    for unit in ("hozon-server.service", "hozon-agent.service"):
        assert "WantedBy=multi-user.target" in (UNITS / unit).read_text()
    directory = tmp_path / "server"
    init = subprocess.run([sys.executable, "-m", "hozon", "server", "init", "--dir", str(directory), "--listen",
                           f"127.0.0.1:{free_port()}", "--json"], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    doc = json.loads(init.stdout)
    proc = start_unit("hozon-server.service", {"HOZON_SERVER_DIR": str(directory)}, tmp_path / "server.log")
    server = RunningServer(directory, doc["url"], doc["fingerprint"], proc, tmp_path / "server.log")
    agent_proc = None
    try:
        def answers() -> bool:
            assert proc.poll() is None, server.log.read_text()
            try:
                with server.client() as c:
                    return c.get("/api/v1/whoami").status_code == 200
            except Exception:
                return False

        wait_for("the server unit to answer", answers, timeout=60)
        agent = enrol(server, tmp_path / "agent", "units", "unit-host")
        source = tmp_path / "data"
        source.mkdir()
        (source / "a.txt").write_text("kept by the agent unit\n")
        server.hozon("job", "add", "unit-files", "--dir", str(directory), "--agent", "unit-host", "--paths",
                     str(source))
        agent_log = tmp_path / "agent.log"
        agent_proc = start_unit("hozon-agent.service", {"HOZON_AGENT_DIR": str(agent.directory)}, agent_log)
        done = server.hozon("job", "run", "unit-files", "--dir", str(directory), "--wait", "--timeout", "120")
        assert "succeeded" in done.stdout
        assert "connected to" in agent_log.read_text()
        agent_proc.send_signal(signal.SIGTERM)
        assert agent_proc.wait(60) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal; systemd counts it as clean
        assert "Traceback" not in agent_log.read_text() + server.log.read_text()
    finally:
        for p in (agent_proc, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
