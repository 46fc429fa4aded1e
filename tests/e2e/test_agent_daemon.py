"""``hozon agent run`` end to end: a real server process, real enrolled agent processes over TLS on
loopback, real file backups into the namespace's repository over HTTPS, restored and checked on the
server side. Faults are real too: the agent killed with -9 or stopped with SIGTERM mid-run, the
server killed with -9 mid-upload and restarted, an agent revoked while it runs, twenty agents at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_locks import GatedSource, gated
from tests.hozon_agents import Agent, AgentProcess, enrol, running_agents, server_side_env
from tests.hozon_server import RunningServer, running_server
from tests.server_fixtures import wait_for

__all__ = ["gated"]  # a fixture used by name

pytestmark = pytest.mark.timeout(600)

LEASE = "6"  # seconds: a silent agent's run is failed this soon


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    monkeypatch.setenv("HOZON_SERVER_TICK_SECONDS", "0.2")
    monkeypatch.setenv("HOZON_SERVER_LEASE_SECONDS", LEASE)
    with running_server(tmp_path) as s:
        yield s


def admin(server: RunningServer, method: str, path: str, body: Any = None) -> Any:
    with server.client() as c:
        response = c.request(method, path, json=body)
    assert response.is_success, response.text
    return response.json() if response.content else None


def add_files_job(server: RunningServer, name: str, agent: str, *paths: Path, **extra: Any) -> None:
    admin(server, "POST", "/api/v1/jobs", {"name": name, "kind": "files", "agent": agent,
                                           "spec": {"paths": [str(p) for p in paths]}, **extra})


def queue(server: RunningServer, job: str) -> int:
    return int(admin(server, "POST", f"/api/v1/jobs/{job}/runs")["id"])


def run_doc(server: RunningServer, run_id: int) -> dict[str, Any]:
    doc: dict[str, Any] = admin(server, "GET", f"/api/v1/runs/{run_id}")
    return doc


def ended(server: RunningServer, run_id: int, timeout: float = 180) -> dict[str, Any]:
    doc: dict[str, Any] = wait_for(f"run {run_id} to end", lambda: (d := run_doc(server, run_id))["state"]
                                   in ("succeeded", "warning", "failed") and d, timeout=timeout)
    return doc


def source_tree(root: Path, seed: int, files: int = 12, size: int = 200_000) -> Path:
    """A small tree of random files (and one empty directory) to back up."""
    rng = __import__("random").Random(seed)
    for i in range(files):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(rng.randbytes(rng.randrange(size)))
    (root / "empty").mkdir(exist_ok=True)
    return root


def hozon_server_side(server: RunningServer, namespace: str, *args: str, check: bool = True
                      ) -> subprocess.CompletedProcess[str]:
    return server.hozon(*args, env=server_side_env(server, namespace), check=check)


def snapshots(server: RunningServer, namespace: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(hozon_server_side(server, namespace, "snapshots", "--json").stdout)
    return doc


def assert_restores(server: RunningServer, namespace: str, snapshot_id: str, source: Path, target: Path) -> None:
    """The snapshot, restored on the server host, holds exactly the bytes of ``source``."""
    hozon_server_side(server, namespace, "restore", snapshot_id, "--target", str(target))
    restored = target / str(source).lstrip("/")
    expected = sorted(p.relative_to(source) for p in source.rglob("*"))
    assert sorted(p.relative_to(restored) for p in restored.rglob("*")) == expected
    for rel in expected:
        if (source / rel).is_file():
            assert (restored / rel).read_bytes() == (source / rel).read_bytes(), rel


def assert_check_passes(server: RunningServer, namespace: str) -> None:
    done = hozon_server_side(server, namespace, "check", "--read-data", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def no_traceback(agent: AgentProcess) -> None:
    assert "Traceback" not in agent.output(), agent.output()


def test_a_file_job_runs_on_the_agent_now_and_on_schedule_and_restores_on_the_server(
        server: RunningServer, tmp_path: Path) -> None:
    agent = enrol(server, tmp_path / "agent", "lab", "web1")
    source = source_tree(tmp_path / "src", 1)
    server.hozon("job", "add", "web-files", "--dir", str(server.directory), "--agent", "web1", "--paths", str(source),
                 "--keep-last", "5")
    with running_agents(agent) as (process,):
        done = server.hozon("job", "run", "web-files", "--dir", str(server.directory), "--wait", "--timeout", "120")
        assert "succeeded" in done.stdout
        runs = json.loads(server.hozon("job", "runs", "web-files", "--dir", str(server.directory), "--json").stdout)
        run = runs[0]
        assert run["state"] == "succeeded" and run["holder"] == "agent web1" and run["snapshot_id"]
        assert run["bytes_read"] == sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
        assert run["bytes_stored"] > 0
        # A job on a schedule (every 2 seconds, the cron form with seconds) is run by the agent too.
        add_files_job(server, "every-2s", "web1", source, schedule="*/2 * * * * *")
        scheduled = wait_for("a scheduled run to succeed", lambda: [
            r for r in admin(server, "GET", "/api/v1/runs?job=every-2s") if r["state"] == "succeeded"], timeout=120)
        assert scheduled[0]["trigger"] == "schedule"
        assert process.stop() == 0  # SIGTERM while idle: a clean stop
    no_traceback(process)
    out = process.output()
    assert out.count("connected to") == 1, out  # one line per change of state, not one per poll
    assert "agent web1 stopped (SIGTERM)" in out
    snap = next(s for s in snapshots(server, "lab") if s["id"] == run["snapshot_id"])
    assert "job:web-files" in snap["tags"]
    assert_restores(server, "lab", run["snapshot_id"], source, tmp_path / "restored")
    assert_check_passes(server, "lab")


def test_an_agent_killed_mid_run_fails_within_the_lease_and_leaves_a_sound_repository(
        server: RunningServer, tmp_path: Path, gated: GatedSource) -> None:
    agent = enrol(server, tmp_path / "agent", "lab", "a1")
    plain = source_tree(tmp_path / "a-plain", 2, files=6, size=2_000_000)
    add_files_job(server, "stuck", "a1", plain, gated.path)
    with running_agents(agent) as (process,):
        run_id = queue(server, "stuck")
        wait_for("the backup to reach the gated file", gated.reading.exists, timeout=120)
        assert run_doc(server, run_id)["state"] == "running"
        process.proc.kill()
        process.proc.wait()
        killed = time.monotonic()
        failed = ended(server, run_id, timeout=60)
        assert time.monotonic() - killed < float(LEASE) + 10
    assert failed["state"] == "failed"
    assert failed["reason"] == f"agent a1 stopped reporting (its lease of {LEASE} s lapsed)"
    assert failed["snapshot_id"] is None
    assert snapshots(server, "lab") == []  # no partial snapshot
    assert_check_passes(server, "lab")


def test_sigterm_mid_run_fails_the_run_cleanly_and_the_agent_exits(server: RunningServer, tmp_path: Path,
                                                                    gated: GatedSource) -> None:
    agent = enrol(server, tmp_path / "agent", "lab", "a1")
    after = source_tree(tmp_path / "z-after", 4)  # walked after the gated file: the stop is seen there
    add_files_job(server, "stopped", "a1", gated.path, after)
    with running_agents(agent) as (process,):
        run_id = queue(server, "stopped")
        wait_for("the backup to reach the gated file", gated.reading.exists, timeout=120)
        process.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        gated.open()  # the read returns; the backup's next progress callback sees the stop
        assert process.proc.wait(60) == 0
    failed = run_doc(server, run_id)
    assert failed["state"] == "failed"
    assert failed["reason"] == "agent a1 was stopped during the run (SIGTERM)"
    no_traceback(process)
    assert snapshots(server, "lab") == []
    assert_check_passes(server, "lab")
    assert not list((server.directory / "datastore" / "lab" / "locks").iterdir())  # its lock went with it


def test_the_server_killed_mid_upload_and_restarted_the_run_resumes_or_fails_cleanly(
        tmp_path: Path, gated: GatedSource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOZON_SERVER_LEASE_SECONDS", "40")  # the run outlives the server's absence
    with running_server(tmp_path) as server:
        agent = enrol(server, tmp_path / "agent", "lab", "a1")
        after = source_tree(tmp_path / "z-after", 3, files=8, size=3_000_000)  # uploaded after the restart
        add_files_job(server, "through-a-crash", "a1", gated.path, after)
        with running_agents(agent) as (process,):
            run_id = queue(server, "through-a-crash")
            wait_for("the backup to reach the gated file", gated.reading.exists, timeout=120)
            server.stop(signal.SIGKILL)
            gated.open()  # uploads now meet a server that is gone
            time.sleep(3)
            server.start()
            final = ended(server, run_id, timeout=240)
            wait_for("the agent to log the run's end", lambda: f"run {run_id} of job through-a-crash {final['state']}"
                     in process.output(), timeout=60)
            assert process.proc.poll() is None  # the agent lives on through the server's absence
            out = process.output()
            # Whether the agent itself noticed the gap depends on whether a progress report fell into
            # it (uploads are retried quietly by the storage client); if it did, it says so once and
            # says when it is back.
            if "the server cannot be reached" in out:
                assert out.count("connected to") == 2, out
            no_traceback(process)
        assert final["state"] in ("succeeded", "failed"), final
        ids = [s["id"] for s in snapshots(server, "lab")]
        if final["state"] == "succeeded":
            assert ids == [final["snapshot_id"]]
            target = tmp_path / "restored"
            hozon_server_side(server, "lab", "restore", final["snapshot_id"], "--target", str(target))
            for f in after.rglob("*.bin"):
                assert (target / str(f).lstrip("/")).read_bytes() == f.read_bytes()
        else:
            assert final["reason"] and ids == []
        assert_check_passes(server, "lab")


def test_a_revoked_agent_stops_with_one_sentence(server: RunningServer, tmp_path: Path) -> None:
    agent = enrol(server, tmp_path / "agent", "lab", "gone")
    with running_agents(agent) as (process,):
        wait_for("the agent to connect", lambda: "connected to" in process.output(), timeout=60)
        server.hozon("agent", "revoke", "gone", "--dir", str(server.directory))
        assert process.proc.wait(60) == 1
    out = process.output()
    no_traceback(process)
    assert f"the server at {server.url} no longer accepts agent gone's credential" in out, out


def test_twenty_agents_back_up_at_once_and_every_snapshot_restores(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOZON_SERVER_LEASE_SECONDS", "60")  # the default: twenty agents on two cores are slow
    with running_server(tmp_path) as server:
        twenty_agents(server, tmp_path)


def twenty_agents(server: RunningServer, tmp_path: Path) -> None:
    count = 20
    names = [f"host{i:02d}" for i in range(count)]

    def enrol_one(i: int) -> Agent:
        return enrol(server, tmp_path / names[i] / "agent", f"ns{i % 4}", names[i])

    with ThreadPoolExecutor(4) as pool:
        agents = list(pool.map(enrol_one, range(count)))
    sources = {a.name: source_tree(tmp_path / a.name / "data", i, files=6, size=400_000) for i, a in enumerate(agents)}
    for a in agents:
        add_files_job(server, f"job-{a.name}", a.name, sources[a.name])
    started = time.monotonic()
    with running_agents(*agents) as processes:
        runs = {a.name: queue(server, f"job-{a.name}") for a in agents}
        done = {name: ended(server, run_id, timeout=400) for name, run_id in runs.items()}
        took = time.monotonic() - started
        for p in processes:
            assert p.stop() == 0
    for p in processes:
        no_traceback(p)
    assert {name: (d["state"], d["reason"]) for name, d in done.items()} == dict.fromkeys(runs, ("succeeded", ""))
    running = [(d["started"], d["finished"]) for d in done.values()]
    assert max(s for s, _ in running) < min(f for _, f in running), "the runs did not overlap"
    for a in agents:
        assert_restores(server, a.namespace, done[a.name]["snapshot_id"], sources[a.name], tmp_path / a.name / "r")
    for ns in {a.namespace for a in agents}:
        assert len(snapshots(server, ns)) == count // 4
        assert_check_passes(server, ns)
    print(f"twenty agents: {took:.1f} s from the first queued run to the last finish")


def test_two_runs_for_one_vm_at_once_the_second_is_refused(tmp_path: Path) -> None:
    from hozon.agent.jobs import RunRefused, VmGuard

    def other_process() -> str:
        code = ("import sys; from pathlib import Path; from hozon.agent.jobs import VmGuard, RunRefused\n"
                "try:\n    VmGuard(Path(sys.argv[1])).hold('web1', 9).__enter__(); print('held')\n"
                "except RunRefused as exc:\n    print(exc)")
        return subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                              env=os.environ, timeout=60).stdout.strip()

    guard = VmGuard(tmp_path)
    with guard.hold("web1", 7):
        with pytest.raises(RunRefused, match="VM web1 is being backed up by run 7 on this agent"):
            guard.hold("web1", 8).__enter__()
        assert other_process() == "VM web1 is being backed up by run 7 on this agent; one run per VM at a time"
        with guard.hold("db1", 8):  # another VM is no conflict
            pass
    assert other_process() == "held"  # the holder is done: its lock is gone
