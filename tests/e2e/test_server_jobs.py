"""Jobs and runs through a real server process, on SQLite and on a real PostgreSQL: hozon job add,
list, run, runs and log over HTTPS; the agent protocol driven as an agent would drive it; retention
after successful runs; verify and prune run by the server; leases that lapse; one agent kept out of
another's runs; the metrics endpoint."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from tests.hozon_server import RunningServer, running_server
from tests.server_fixtures import (
    AgentApi,
    add_agent,
    catalog,
    catalog_url,
    hozon_env,
    namespace_repository,
    postgres,
    wait_for,
)

from hozon.server import pki
from hozon.server.catalog.db import Catalog
from hozon.server.catalog.models import Job, Run, utcnow
from hozon.server.paths import ServerDir

__all__ = ["catalog", "postgres"]  # fixtures used by name

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def server(tmp_path: Path, catalog: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    monkeypatch.setenv("HOZON_SERVER_TICK_SECONDS", "0.2")
    with running_server(tmp_path, catalog) as s:
        yield s


def job(server: RunningServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return server.hozon("job", *args, "--dir", str(server.directory), check=check)


def job_json(server: RunningServer, *args: str) -> Any:
    return json.loads(job(server, *args, "--json").stdout)


def backup(repo_env: dict[str, str], source: Path, *tags: str) -> str:
    """A snapshot written into the namespace's repository, as an agent's backup would write it."""
    args = [sys.executable, "-m", "hozon", "backup", str(source), "--json"]
    for tag in tags:
        args += ["--tag", tag]
    proc = subprocess.run(args, capture_output=True, text=True, env=hozon_env(repo_env), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["snapshot"]["id"])


def snapshot_ids(repo_env: dict[str, str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "hozon", "snapshots", "--json"], capture_output=True, text=True,
                          env=hozon_env(repo_env), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {s["id"] for s in json.loads(proc.stdout)}


def log_lines(server: RunningServer, run_id: int) -> list[str]:
    return [entry["line"] for entry in job_json(server, "log", str(run_id))]


def test_jobs_are_defined_listed_and_run_through_the_api(server: RunningServer, tmp_path: Path) -> None:
    secret = add_agent(server, "web1", "web")
    added = job_json(server, "add", "web-etc", "--agent", "web1", "--paths", "/etc", "--paths", "/srv/www",
                     "--exclude", "*.tmp", "--schedule", "30 2 * * *", "--keep-last", "3", "--keep-daily", "7")
    assert added["kind"] == "files" and added["namespace"] == "web" and added["agent"] == "web1"
    assert added["spec"] == {"paths": ["/etc", "/srv/www"], "exclude": ["*.tmp"]}
    assert added["retention"] == {"last": 3, "daily": 7} and added["next_run"]

    for args, code, words in (
        (["bad-cron", "--agent", "web1", "--paths", "/etc", "--schedule", "61 * * * *"], 2, "not a valid cron"),
        (["nobody", "--agent", "ghost", "--paths", "/etc"], 1, "no enrolled agent is named ghost"),
        (["web-etc", "--agent", "web1", "--paths", "/etc"], 1, "already exists"),
        (["relative", "--agent", "web1", "--paths", "etc"], 2, "must be absolute"),
        (["two", "--agent", "web1", "--paths", "/etc", "--vm", "db"], 2, "exactly one of"),
        (["vm-no-socket", "--agent", "web1", "--vm", "db"], 2, "exactly one of --qmp"),
        (["keep-none", "--agent", "web1", "--paths", "/etc", "--keep-within", "soon"], 2, "is not a duration"),
        (["verify-keep", "--verify", "web", "--keep-last", "2"], 2, "takes no retention"),
        (["bad-subset", "--verify", "web", "--subset", "9/7"], 2, "1 <= N <= M"),
    ):
        refused = job(server, "add", *args, check=False)
        assert refused.returncode == code, (args, refused.stderr)
        assert words in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) <= 2, refused.stderr  # one sentence (and a hint)
    assert [j["name"] for j in job_json(server, "list")] == ["web-etc"]

    first = job_json(server, "run", "web-etc")
    assert first["state"] == "queued" and first["new"] and first["trigger"] == "manual"
    again = job_json(server, "run", "web-etc")
    assert again["id"] == first["id"] and not again["new"]  # one waiting run per job

    agent = AgentApi(server, secret)
    try:
        assigned = agent.poll()
        assert assigned is not None and assigned["id"] == first["id"]
        assert assigned["job"] == {"name": "web-etc", "kind": "files", "namespace": "web",
                                   "spec": {"paths": ["/etc", "/srv/www"], "exclude": ["*.tmp"]}}
        assert agent.poll() is None  # nothing else queued
        assert agent.progress(first["id"], bytes_read=4096, bytes_stored=100, rate=1e6,
                              current="/etc/passwd").status_code == 200
        running = job_json(server, "runs", "web-etc")[0]
        assert running["state"] == "running" and running["holder"] == "agent web1"
        assert running["progress"]["current"] == "/etc/passwd" and running["bytes_read"] == 4096
        assert agent.log(first["id"], "reading /etc", "reading /srv/www").status_code == 204
        missing = agent.finish(first["id"], "succeeded", snapshot_id="ab" * 32)
        assert missing.status_code == 422 and "not in namespace web's repository" in missing.json()["detail"]
        done = agent.finish(first["id"], "failed", "/srv/www: no such directory", bytes_read=4096)
        assert done.status_code == 200 and done.json()["state"] == "failed"
        assert agent.finish(first["id"], "succeeded").status_code == 409  # once only
    finally:
        agent.close()

    listed = job_json(server, "list")[0]["last_run"]
    assert listed["state"] == "failed" and listed["reason"] == "/srv/www: no such directory"
    lines = log_lines(server, first["id"])
    assert lines[:3] == ["queued (manual)", "claimed by agent web1", "reading /etc"]
    assert lines[-1] == "failed: /srv/www: no such directory"
    text = job(server, "log", str(first["id"])).stdout
    assert "reading /srv/www" in text
    human = job(server, "list").stdout
    assert "web-etc" in human and "30 2 * * *" in human


def test_run_wait_exit_codes_follow_the_outcome(server: RunningServer, tmp_path: Path) -> None:
    secret = add_agent(server, "web1", "web")
    repo_env = namespace_repository(server, "web")
    source = tmp_path / "src"
    source.mkdir()
    (source / "a").write_text("hello")
    job(server, "add", "web-src", "--agent", "web1", "--paths", str(source))
    agent = AgentApi(server, secret)
    try:
        outcomes = [("succeeded", "", 0), ("warning", "2 files could not be read", 3),
                    ("failed", "the VM went away", 1)]
        for state, reason, code in outcomes:
            waiter = subprocess.Popen([sys.executable, "-m", "hozon", "job", "run", "web-src", "--wait", "--dir",
                                       str(server.directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            assigned = wait_for("the run", lambda: agent.poll(wait=2))
            snapshot = backup(repo_env, source) if state != "failed" else None
            extra = {"snapshot_id": snapshot} if snapshot else {}
            assert agent.finish(assigned["id"], state, reason, bytes_read=5, **extra).status_code == 200
            out, err = waiter.communicate(timeout=60)
            assert waiter.returncode == code, (state, out, err)
            if state == "failed":
                assert f"run {assigned['id']} of job web-src failed: the VM went away" in err
            else:
                assert f"run {assigned['id']} {state}" in out
    finally:
        agent.close()


def test_retention_keeps_the_jobs_newest_snapshots_only(server: RunningServer, tmp_path: Path) -> None:
    secret = add_agent(server, "web1", "web")
    repo_env = namespace_repository(server, "web")
    source = tmp_path / "src"
    source.mkdir()
    outside = backup(repo_env, source, "manual")  # made outside the job: retention never touches it
    job(server, "add", "web-src", "--agent", "web1", "--paths", str(source), "--keep-last", "2")
    agent = AgentApi(server, secret)
    made: list[str] = []
    try:
        for n in range(3):
            (source / f"file{n}").write_text(f"version {n}")
            run = job_json(server, "run", "web-src")
            assert agent.poll()["id"] == run["id"]  # type: ignore[index]
            made.append(backup(repo_env, source))
            assert agent.finish(run["id"], "succeeded", snapshot_id=made[-1], bytes_read=10).status_code == 200
            line = wait_for("retention", lambda rid=run["id"]: [x for x in log_lines(server, rid)
                                                                if x.startswith("retention")])
            removed = 1 if n == 2 else 0
            assert line == [f"retention: kept {min(n + 1, 2)} snapshot(s) of this job, removed {removed}"
                            + (f": {made[0]}" if removed else "")]
    finally:
        agent.close()
    assert snapshot_ids(repo_env) == {outside, made[1], made[2]}
    check = subprocess.run([sys.executable, "-m", "hozon", "check"], capture_output=True, text=True,
                           env=hozon_env(repo_env), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_verify_and_prune_run_on_the_server(server: RunningServer, tmp_path: Path) -> None:
    repo_env = namespace_repository(server, "web")
    source = tmp_path / "src"
    source.mkdir()
    (source / "big").write_bytes(bytes(range(256)) * 40_000)
    old = backup(repo_env, source)
    (source / "big").write_bytes(b"\x01" * 3_000_000)
    backup(repo_env, source)
    forget = subprocess.run([sys.executable, "-m", "hozon", "forget", old], capture_output=True, text=True,
                            env=hozon_env(repo_env), timeout=120)
    assert forget.returncode == 0, forget.stderr
    packs_before = list((Path(repo_env["HOZON_REPO"]) / "data").rglob("*"))

    job(server, "add", "web-prune", "--prune", "web")
    job(server, "add", "web-verify", "--verify", "web", "--subset", "1/1")
    pruned = job(server, "run", "web-prune", "--wait")
    assert "succeeded" in pruned.stdout, pruned.stdout + pruned.stderr
    run = job_json(server, "runs", "web-prune")[0]
    assert run["holder"].startswith("server process ")
    assert any(x.startswith("deleted 1 pack(s)") for x in log_lines(server, run["id"])), log_lines(server, run["id"])
    assert len(list((Path(repo_env["HOZON_REPO"]) / "data").rglob("*"))) < len(packs_before)

    verified = job(server, "run", "web-verify", "--wait")
    assert "succeeded" in verified.stdout
    run = job_json(server, "runs", "web-verify")[0]
    assert run["bytes_read"] > 0
    assert any(x.startswith("checked ") and "(subset 1/1)" in x for x in log_lines(server, run["id"]))

    pack = next(p for p in (Path(repo_env["HOZON_REPO"]) / "data").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.chmod(0o600)
    pack.write_bytes(bytes(data))
    damaged = job(server, "run", "web-verify", "--wait", check=False)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert "failed: verify found" in damaged.stderr and "Traceback" not in damaged.stderr

    job(server, "add", "nothing-verify", "--verify", "empty")
    missing = job(server, "run", "nothing-verify", "--wait", check=False)
    assert missing.returncode == 1 and "namespace empty has no repository yet" in missing.stderr


def test_a_silent_agent_loses_its_run(tmp_path: Path, catalog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOZON_SERVER_TICK_SECONDS", "0.2")
    monkeypatch.setenv("HOZON_SERVER_LEASE_SECONDS", "3")
    with running_server(tmp_path, catalog) as server:
        secret = add_agent(server, "web1", "web")
        job(server, "add", "web-etc", "--agent", "web1", "--paths", "/etc")
        run = job_json(server, "run", "web-etc")
        agent = AgentApi(server, secret)
        try:
            assert agent.poll()["id"] == run["id"]  # type: ignore[index]
            for _ in range(5):  # reporting keeps it alive past the lease
                time.sleep(1)
                assert agent.progress(run["id"], bytes_read=1).status_code == 200
            with server.client() as admin:
                assert admin.get(f"/api/v1/runs/{run['id']}").json()["state"] == "running"
            failed = wait_for("the lease to lapse",
                              lambda: [r for r in job_json(server, "runs") if r["state"] == "failed"], timeout=30)
            assert failed[0]["reason"] == "agent web1 stopped reporting (its lease of 3 s lapsed)"
            late = agent.progress(run["id"], bytes_read=2)
            assert late.status_code == 409 and "is failed" in late.json()["detail"]
            assert agent.finish(run["id"], "succeeded").status_code == 409
            assert job_json(server, "runs")[0]["state"] == "failed"
            waited = job(server, "run", "web-etc", "--wait", "--timeout", "1", check=False)
            assert waited.returncode == 1 and "is still queued after 1 s" in waited.stderr
        finally:
            agent.close()

        # A server process that died while it verified: another one fails its run the same way.
        job(server, "add", "web-verify", "--verify", "web")
        db = Catalog(catalog_url(server))
        try:
            with db.session() as s:
                verify_job = s.scalars(select(Job).where(Job.name == "web-verify")).one()
                s.add(Run(job=verify_job, state="running", started=utcnow(), lease_owner="server:gone:4242",
                          lease_expires=utcnow() + datetime.timedelta(seconds=1)))
        finally:
            db.close()
        orphan = wait_for("the dead server's lease to lapse",
                          lambda: [r for r in job_json(server, "runs", "web-verify") if r["state"] == "failed"])
        assert orphan[0]["reason"] == "server process gone:4242 stopped reporting (its lease of 3 s lapsed)"


def test_an_agent_sees_only_its_own_runs(server: RunningServer) -> None:
    mine, theirs = add_agent(server, "web1", "web"), add_agent(server, "db1", "db")
    job(server, "add", "web-etc", "--agent", "web1", "--paths", "/etc")
    run = job_json(server, "run", "web-etc")
    owner, other = AgentApi(server, mine), AgentApi(server, theirs)
    try:
        assert other.poll() is None  # another agent's run is never handed out
        assert owner.poll()["id"] == run["id"]  # type: ignore[index]
        for response in (other.progress(run["id"], bytes_read=1), other.log(run["id"], "forged"),
                         other.finish(run["id"], "failed", "forged")):
            assert response.status_code == 403 and "belongs to another agent" in response.json()["detail"]
        after = job_json(server, "runs")[0]
        assert after["state"] == "running" and after["bytes_read"] == 0
        assert "forged" not in " ".join(log_lines(server, run["id"]))
        with server.client() as admin:
            assert admin.post("/api/v1/agent/poll", json={"wait": 0}).status_code == 403
        with server.client(token=mine) as as_agent:
            assert as_agent.get("/api/v1/jobs").status_code == 403
            assert as_agent.post("/api/v1/jobs/web-etc/runs").status_code == 403
        with server.client(token="") as anonymous:
            assert anonymous.post("/api/v1/agent/poll", json={"wait": 0}).status_code == 401
            assert anonymous.get("/api/v1/runs").status_code == 401
    finally:
        owner.close()
        other.close()


def test_the_schedule_queues_runs(server: RunningServer) -> None:
    secret = add_agent(server, "web1", "web")
    job(server, "add", "every-second", "--agent", "web1", "--paths", "/etc", "--schedule", "* * * * * *")
    agent = AgentApi(server, secret)
    try:
        for _ in range(2):
            assigned = wait_for("a scheduled run", lambda: agent.poll(wait=3), timeout=30)
            assert agent.finish(assigned["id"], "failed", "test").status_code == 200
    finally:
        agent.close()
    runs = job_json(server, "runs", "every-second")
    assert all(r["trigger"] == "schedule" for r in runs)
    assert sum(r["state"] == "queued" for r in runs) <= 1  # a waiting run is never queued twice


def test_metrics_need_a_credential_and_report_runs(server: RunningServer, tmp_path: Path) -> None:
    secret = add_agent(server, "web1", "web")
    repo_env = namespace_repository(server, "web")
    source = tmp_path / "src"
    source.mkdir()
    job(server, "add", "web-src", "--agent", "web1", "--paths", str(source))
    agent = AgentApi(server, secret)
    try:
        for state in ("succeeded", "failed"):
            run = job_json(server, "run", "web-src")
            assert agent.poll()["id"] == run["id"]  # type: ignore[index]
            extra = {"snapshot_id": backup(repo_env, source)} if state == "succeeded" else {}
            agent.finish(run["id"], state, "disk full" if state == "failed" else "", bytes_read=1000,
                         bytes_stored=10, **extra)
    finally:
        agent.close()
    metrics_token = (server.directory / "metrics.token").read_text().strip()
    with httpx.Client(base_url=server.url, verify=server.tls(), timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
        text = http.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"}).text
    assert f'hozon_job_last_success_timestamp_seconds{{job="web-src",kind="files",subject="{source}"}}' in text
    assert 'hozon_run_failures_total{job="web-src",reason="disk full"} 1.0' in text
    assert 'hozon_runs_total{job="web-src",state="succeeded"} 1.0' in text
    assert 'hozon_job_bytes_read_total{job="web-src"} 2000.0' in text
    assert 'hozon_job_last_run_duration_seconds{job="web-src",state="failed"}' in text
    assert "hozon_agents_connected 1.0" in text and "hozon_agents_enrolled 1.0" in text


def test_admin_commands_from_another_host(server: RunningServer, tmp_path: Path) -> None:
    job(server, "add", "web-verify", "--verify", "web")
    remote = ["job", "list", "--json", "--server", server.url, "--ca", str(server.ca)]
    listed = server.hozon(*remote, env={"HOZON_SERVER_TOKEN": server.admin_token})
    assert [j["name"] for j in json.loads(listed.stdout)] == ["web-verify"]
    pinned = server.hozon(*remote, "--fingerprint", server.fingerprint, env={"HOZON_SERVER_TOKEN": server.admin_token})
    assert pinned.returncode == 0
    wrong_pin = server.hozon(*remote, "--fingerprint", "00" * 32, env={"HOZON_SERVER_TOKEN": server.admin_token},
                             check=False)
    assert wrong_pin.returncode == 2 and "does not have the fingerprint" in wrong_pin.stderr
    no_token = server.hozon(*remote, env={"HOZON_SERVER_TOKEN": ""}, check=False)
    assert no_token.returncode == 2 and "HOZON_SERVER_TOKEN is not set" in no_token.stderr
    forged = server.hozon(*remote, env={"HOZON_SERVER_TOKEN": "hzadm_forged"}, check=False)
    assert forged.returncode == 1 and "refused the credential" in forged.stderr
    stranger = ServerDir(tmp_path / "stranger")
    pki.create_ca(stranger)
    impostor = server.hozon("job", "list", "--server", server.url, "--ca", str(stranger.ca_cert),
                            env={"HOZON_SERVER_TOKEN": server.admin_token}, check=False)
    assert impostor.returncode == 1 and "did not present a certificate signed by the pinned CA" in impostor.stderr
    no_server = server.hozon("job", "list", check=False)
    assert no_server.returncode == 2 and "no server given" in no_server.stderr
