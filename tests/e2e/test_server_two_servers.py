"""Two real server processes sharing one real PostgreSQL catalog: a burst of runs, claimed by
agents polling both servers at once and by both servers' own workers, is executed exactly once."""

from __future__ import annotations

import collections
import datetime
import itertools
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from tests.hozon_server import RunningServer, running_server
from tests.server_fixtures import (
    NEEDS_POSTGRES,
    AgentApi,
    Postgres,
    add_agent,
    namespace_repository,
    postgres,
    wait_for,
)

from hozon.server.catalog.db import Catalog, upgrade
from hozon.server.catalog.models import Job, Run
from hozon.server.context import ServerContext
from hozon.server.jobs import namespace_row
from hozon.server.paths import ServerDir, ServerSettings
from hozon.server.scheduler import queue_due

__all__ = ["postgres"]  # a fixture used by name

pytestmark = [pytest.mark.timeout(600), NEEDS_POSTGRES]

AGENTS = 4
JOBS_PER_AGENT = 10
ROUNDS = 3


def drain(servers: list[RunningServer], secrets: dict[str, str]) -> list[int]:
    """Every agent polls both servers from two threads until nothing is left; each run it gets it
    finishes at once. The ids of the runs handed out, in the order they were."""
    claimed: list[int] = []
    mutex = threading.Lock()
    errors: list[BaseException] = []

    def work(server: RunningServer, secret: str) -> None:
        api = AgentApi(server, secret)
        empty = 0
        try:
            while empty < 3:
                assigned = api.poll(wait=0)
                if assigned is None:
                    empty += 1
                    time.sleep(0.3)
                    continue
                empty = 0
                with mutex:
                    claimed.append(assigned["id"])
                response = api.finish(assigned["id"], "failed", "burst test")
                assert response.status_code == 200, response.text
        except BaseException as exc:
            errors.append(exc)
        finally:
            api.close()

    threads = [threading.Thread(target=work, args=(server, secret)) for secret in secrets.values()
               for server in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return claimed


def test_two_servers_never_run_one_run_twice(tmp_path: Path, postgres: Postgres,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOZON_SERVER_TICK_SECONDS", "0.2")
    url = postgres.new_database()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_server(tmp_path / "a", url) as one, running_server(tmp_path / "b", url) as two:
        servers = [one, two]
        secrets = {f"agent{i}": add_agent(one, f"agent{i}", "web") for i in range(AGENTS)}
        names = [f"job-{a}-{j}" for a in secrets for j in range(JOBS_PER_AGENT)]
        with one.client() as admin:
            for name in names:
                agent = name.split("-")[1]
                assert admin.post("/api/v1/jobs", json={"name": name, "kind": "files", "agent": agent,
                                                        "spec": {"paths": ["/etc"]}}).status_code == 201
        clients = [one.client(), two.client()]
        try:
            queued: list[int] = []
            for _ in range(ROUNDS):
                for n, name in enumerate(names):  # queued through both servers
                    response = clients[n % 2].post(f"/api/v1/jobs/{name}/runs")
                    assert response.status_code == 201 and response.json()["new"], response.text
                    queued.append(response.json()["id"])
                claimed = drain(servers, secrets)
                counts = collections.Counter(claimed)
                assert [i for i, c in counts.items() if c > 1] == [], "a run was handed out twice"
                assert sorted(claimed) == sorted(queued[-len(names):])
            runs = clients[0].get("/api/v1/runs", params={"limit": 1000}).json()
            assert len(runs) == ROUNDS * len(names)
            assert {r["state"] for r in runs} == {"failed"} and {r["reason"] for r in runs} == {"burst test"}

            # The servers' own workers: verify runs over one namespace, on storage both servers share.
            namespace_repository(one, "web")
            for part in ("datastore", "keys"):
                if (two.directory / part).exists():
                    (two.directory / part).rmdir()
                (two.directory / part).symlink_to(one.directory / part)
            verify_names = [f"verify-{n}" for n in range(12)]
            for n, name in enumerate(verify_names):
                assert clients[n % 2].post("/api/v1/jobs", json={"name": name, "kind": "verify",
                                                                  "namespace": "web"}).status_code == 201
            verify_ids = [clients[n % 2].post(f"/api/v1/jobs/{name}/runs").json()["id"]
                          for n, name in enumerate(verify_names)]

            def all_done() -> list[dict[str, object]] | None:
                found = [clients[0].get(f"/api/v1/runs/{i}").json() for i in verify_ids]
                return found if all(r["state"] in ("succeeded", "failed") for r in found) else None

            done = wait_for("the verify runs", all_done, timeout=300, interval=0.5)
            assert {r["state"] for r in done} == {"succeeded"}, [r["reason"] for r in done]
            for run_id in verify_ids:
                lines = [x["line"] for x in clients[0].get(f"/api/v1/runs/{run_id}/log").json()]
                assert sum(x.startswith("claimed by server process") for x in lines) == 1, lines
                assert sum(x.startswith("checked ") for x in lines) == 1, lines

            # Both schedulers see a job due every 2 s: no due time gets two runs.
            assert clients[1].post("/api/v1/jobs", json={"name": "verify-often", "kind": "verify", "namespace": "web",
                                                         "schedule": "* * * * * */2"}).status_code == 201
            time.sleep(9)
            often = clients[0].get("/api/v1/runs", params={"job": "verify-often"}).json()
            queued_at = sorted(datetime.datetime.fromisoformat(r["queued_at"]) for r in often)
            assert 2 <= len(queued_at) <= 6, queued_at
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(queued_at)]
            assert min(gaps) >= 1, gaps
        finally:
            for c in clients:
                c.close()


def test_two_schedulers_queue_each_due_job_once(tmp_path: Path, postgres: Postgres) -> None:
    """Two schedulers (each with its own connections, as two servers have) tick at the same moment
    over 200 due jobs: every job is queued by exactly one of them."""
    url = postgres.new_database()
    contexts = []
    for n in range(2):
        catalog = Catalog(url)
        upgrade(catalog.engine)
        contexts.append(ServerContext(ServerDir(tmp_path / str(n)), ServerSettings(catalog=url), catalog, "",
                                      identity=f"server:test:{n}"))
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    with contexts[0].catalog.session() as s:
        namespace = namespace_row(s, "web")
        s.add_all(Job(name=f"due-{n}", kind="prune", namespace=namespace, schedule="0 3 * * *", next_run=past)
                  for n in range(200))
    barrier = threading.Barrier(2)
    queued: list[list[int]] = [[], []]

    def tick(n: int) -> None:
        barrier.wait()
        queued[n] = queue_due(contexts[n])

    threads = [threading.Thread(target=tick, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(queued[0]) + len(queued[1]) == 200 and not set(queued[0]) & set(queued[1])
    with contexts[0].catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Run)) == 200
        assert all(job.next_run is not None and job.next_run > past for job in s.scalars(select(Job)))
    for ctx in contexts:
        ctx.catalog.close()
