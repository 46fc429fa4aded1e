"""The server's catalog at scale: ``job list`` latency with 10,000 runs, on SQLite and PostgreSQL.

    python bench/server.py                       # both catalogs, 100 jobs, 10,000 runs
    python bench/server.py --catalogs sqlite --runs 100000

For each catalog: a real ``hozon server`` process (TLS on 127.0.0.1) whose catalog holds JOBS jobs
and RUNS finished runs (each with three log lines), inserted in bulk. Measured: the latency of
``GET /api/v1/jobs`` (what ``hozon job list`` asks: every job with its last run) and of
``GET /api/v1/runs?limit=50`` (``hozon job runs``) over a kept-alive HTTPS connection, p50 and p99 of
REQUESTS requests after a warm-up; and the wall time of the whole ``hozon job list --json`` command
(process start included). PostgreSQL is a private one started with initdb/pg_ctl (as the tests do).
Writes bench/results/server-<UTC time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the real-server and PostgreSQL helpers the tests use

from sqlalchemy import insert  # noqa: E402
from tests.hozon_server import running_server  # noqa: E402
from tests.server_fixtures import catalog_url, start_postgres  # noqa: E402

from hozon.server.catalog.db import Catalog  # noqa: E402
from hozon.server.catalog.models import Agent, Job, Namespace, Run, RunLog  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def fill(url: str, jobs: int, runs: int) -> None:
    """JOBS files jobs on one agent, and RUNS finished runs spread over them, with log lines."""
    catalog = Catalog(url)
    now = datetime.datetime.now(datetime.UTC)
    with catalog.session() as s:
        namespace = Namespace(name="bench")
        agent = Agent(name="bench-agent", namespace=namespace, secret_sha256="0" * 64)
        s.add_all([namespace, agent])
        s.flush()
        s.execute(insert(Job), [{"name": f"job-{n:04d}", "kind": "files", "agent_id": agent.id,
                                 "namespace_id": namespace.id, "spec": {"paths": [f"/srv/{n}"]}, "schedule": None,
                                 "retention": {"last": 7}, "enabled": True, "created": now} for n in range(jobs)])
    job_ids = list(range(1, jobs + 1))
    batch = 5000
    for start in range(0, runs, batch):
        with catalog.session() as s:
            rows = []
            for n in range(start, min(runs, start + batch)):
                began = now - datetime.timedelta(minutes=runs - n)
                rows.append({"job_id": job_ids[n % jobs], "state": "failed" if n % 17 == 0 else "succeeded",
                             "trigger": "schedule", "queued_at": began, "started": began,
                             "finished": began + datetime.timedelta(seconds=30), "reason": "",
                             "bytes_read": 1 << 30, "bytes_stored": 1 << 20, "snapshot_id": f"{n:064x}",
                             "progress": {}})
            s.execute(insert(Run), rows)
        with catalog.session() as s:
            s.execute(insert(RunLog), [{"run_id": n + 1, "at": now, "line": f"line {k} of run {n + 1}"}
                                       for n in range(start, min(runs, start + batch)) for k in range(3)])
    catalog.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(catalog: str, jobs: int, runs: int, requests: int, commands: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hozon-bench-server-") as tmp, running_server(Path(tmp), catalog) as srv:
        started = time.perf_counter()
        fill(catalog_url(srv), jobs, runs)
        fill_seconds = time.perf_counter() - started
        result: dict[str, Any] = {"fill_seconds": round(fill_seconds, 2)}
        with srv.client() as http:
            for label, path, params in (("job_list", "/api/v1/jobs", None),
                                        ("job_runs", "/api/v1/runs", {"limit": 50})):
                for _ in range(10):
                    assert http.get(path, params=params).status_code == 200
                times = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    response = http.get(path, params=params)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert response.status_code == 200
                if label == "job_list":
                    assert len(response.json()) == jobs
                result[label] = {"p50_ms": round(statistics.median(times), 2),
                                 "p99_ms": round(percentile(times, 99), 2), "requests": requests}
        walls = []
        for _ in range(commands):
            t0 = time.perf_counter()
            srv.hozon("job", "list", "--json", "--dir", str(srv.directory))
            walls.append(time.perf_counter() - t0)
        result["command_job_list_seconds_p50"] = round(statistics.median(walls), 3)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--catalogs", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--commands", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        for name in args.catalogs.split(","):
            url = stack.enter_context(start_postgres()).new_database() if name == "postgresql" else ""
            print(f"{name}: filling {args.jobs} jobs, {args.runs} runs …", file=sys.stderr)
            results[name] = measure(url, args.jobs, args.runs, args.requests, args.commands)
    doc = {"bench": "server", "time": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "jobs": args.jobs, "runs": args.runs,
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"server-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'catalog':<12}{'job list p50':>14}{'p99':>10}{'job runs p50':>14}{'p99':>10}{'command':>10}")
    for name, r in results.items():
        print(f"{name:<12}{r['job_list']['p50_ms']:>11.1f} ms{r['job_list']['p99_ms']:>7.1f} ms"
              f"{r['job_runs']['p50_ms']:>11.1f} ms{r['job_runs']['p99_ms']:>7.1f} ms"
              f"{r['command_job_list_seconds_p50']:>9.2f} s")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
