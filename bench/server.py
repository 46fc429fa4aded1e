"""The server at scale: its catalog (``job list`` latency with 10,000 runs, SQLite and PostgreSQL),
and backups through it (a file tree and a VM image over HTTPS vs into a local directory; the total
throughput of 1, 4 and 16 agents at once).

    python bench/server.py                       # both parts
    python bench/server.py --part catalog --catalogs sqlite --runs 100000
    python bench/server.py --part transfer --size-mib 1024 --agents 1,4,16

For each catalog: a real ``hozon server`` process (TLS on 127.0.0.1) whose catalog holds JOBS jobs
and RUNS finished runs (each with three log lines), inserted in bulk. Measured: the latency of
``GET /api/v1/jobs`` (what ``hozon job list`` asks: every job with its last run) and of
``GET /api/v1/runs?limit=50`` (``hozon job runs``) over a kept-alive HTTPS connection, p50 and p99 of
REQUESTS requests after a warm-up; and the wall time of the whole ``hozon job list --json`` command
(process start included). PostgreSQL is a private one started with initdb/pg_ctl (as the tests do).

Transfer: a real server and enrolled agents on 127.0.0.1. The same data is backed up by ``hozon
backup`` (a tree of SIZE MiB: random and compressible files) and ``hozon vm backup --image`` (a raw
image of 2×SIZE MiB, half of it written) once into ``hozon+https://…`` (the agent's repository on
the server) and once into a local directory, each into a fresh repository; the ratio is the cost of
the server (target ≤ 1.2). Then 1, 4 and 16 real ``hozon agent run`` processes each run a file job of
PER_AGENT MiB of fresh random data at once: total bytes / (first start to last finish).
Writes bench/results/server-<UTC time>.json and prints tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
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
from tests.hozon_agents import enrol, running_agents  # noqa: E402
from tests.hozon_server import RunningServer, running_server  # noqa: E402
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


def random_tree(root: Path, mib: int, seed: int) -> int:
    """Files of 1–8 MiB, half random, half compressible text; their total size."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    while total < mib << 20:
        size = min(rng.randrange(1 << 20, 8 << 20), (mib << 20) - total)
        data = rng.randbytes(size) if n % 2 == 0 else (b"%d lorem ipsum dolor %d\n" % (n, rng.randrange(9 ** 9)) *
                                                      (size // 24 + 1))[:size]
        (root / f"f{n:04d}.bin").write_bytes(data)
        total, n = total + size, n + 1
    return total


def timed(srv: RunningServer, args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    srv.hozon(*args, env=env, timeout=3600)
    return time.perf_counter() - t0


def transfer(work: Path, size_mib: int, per_agent_mib: int, counts: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {"size_mib": size_mib}
    tree = work / "tree"
    tree_bytes = random_tree(tree, size_mib, 1)
    image = work / "disk.raw"
    with open(image, "wb") as f:  # 2×SIZE MiB, every other MiB written: half allocated
        rng = random.Random(2)
        for mib in range(2 * size_mib):
            if mib % 2 == 0:
                f.seek(mib << 20)
                f.write(rng.randbytes(1 << 20))
        f.truncate(2 * size_mib << 20)
    with running_server(work) as srv:
        agents = [enrol(srv, work / f"agent{i:02d}", f"ns{i % 4}", f"bench{i:02d}") for i in range(max(counts))]
        local = {"HOZON_PASSWORD": "bench", "HOZON_AGENT_DIR": ""}
        for label, args in (("files", ["backup", str(tree)]),
                            ("vm_image", ["vm", "backup", "--image", str(image), "--name", "bench-vm"])):
            seconds = {}
            for where in ("local", "server"):
                if where == "local":
                    repo = work / f"local-{label}"
                    env = {**local, "HOZON_REPO": str(repo)}
                    srv.hozon("init", env=env)
                else:  # a fresh namespace for each measurement
                    solo = f"solo-{label.replace('_', '-')}"
                    env = enrol(srv, work / solo, solo, solo).env
                seconds[where] = timed(srv, args, env)
            data = tree_bytes if label == "files" else size_mib << 20
            result[label] = {"bytes": data, "local_seconds": round(seconds["local"], 2),
                             "server_seconds": round(seconds["server"], 2),
                             "ratio": round(seconds["server"] / seconds["local"], 2),
                             "server_mib_s": round(data / seconds["server"] / 2 ** 20, 1)}
        concurrent = {}
        with running_agents(*agents):
            for round_, count in enumerate(counts):
                runs = []
                for i, agent in enumerate(agents[:count]):
                    data = work / f"round{round_}" / agent.name
                    random_tree(data, per_agent_mib, 1000 * round_ + i)
                    name = f"r{round_}-{agent.name}"
                    with srv.client() as http:
                        http.post("/api/v1/jobs", json={"name": name, "kind": "files", "agent": agent.name,
                                                        "spec": {"paths": [str(data)]}}).raise_for_status()
                with srv.client() as http:
                    for agent in agents[:count]:
                        runs.append(http.post(f"/api/v1/jobs/r{round_}-{agent.name}/runs").json()["id"])
                    docs = []
                    for run_id in runs:
                        while (doc := http.get(f"/api/v1/runs/{run_id}").json())["state"] not in (
                                "succeeded", "warning", "failed"):
                            time.sleep(0.5)
                        docs.append(doc)
                assert all(d["state"] == "succeeded" for d in docs), docs
                first = min(datetime.datetime.fromisoformat(d["started"]) for d in docs)
                last = max(datetime.datetime.fromisoformat(d["finished"]) for d in docs)
                total = sum(d["bytes_read"] for d in docs)
                wall = (last - first).total_seconds()
                concurrent[str(count)] = {"bytes": total, "seconds": round(wall, 2),
                                          "total_mib_s": round(total / wall / 2 ** 20, 1)}
                print(f"{count} agent(s): {total >> 20} MiB in {wall:.1f} s", file=sys.stderr)
        result["agents"] = concurrent
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="catalog,transfer", help="catalog, transfer or both")
    parser.add_argument("--size-mib", type=int, default=256, help="transfer: the file tree's size")
    parser.add_argument("--per-agent-mib", type=int, default=32, help="transfer: each concurrent agent's data")
    parser.add_argument("--agents", default="1,4,16", help="transfer: how many agents at once, in turn")
    parser.add_argument("--catalogs", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--commands", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    results: dict[str, Any] = {}
    parts = args.part.split(",")
    with ExitStack() as stack:
        for name in args.catalogs.split(",") if "catalog" in parts else []:
            url = stack.enter_context(start_postgres()).new_database() if name == "postgresql" else ""
            print(f"{name}: filling {args.jobs} jobs, {args.runs} runs …", file=sys.stderr)
            results[name] = measure(url, args.jobs, args.runs, args.requests, args.commands)
    if "transfer" in parts:
        work = ROOT / "bench" / "work" / "server"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            results["transfer"] = transfer(work, args.size_mib, args.per_agent_mib,
                                           [int(n) for n in args.agents.split(",")])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"bench": "server", "time": datetime.datetime.now(datetime.UTC).isoformat(), "host": platform.node(),
           "cpus": os.cpu_count(), "python": platform.python_version(), "jobs": args.jobs, "runs": args.runs,
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"server-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    transferred = results.pop("transfer", None)
    if results:
        print(f"{'catalog':<12}{'job list p50':>14}{'p99':>10}{'job runs p50':>14}{'p99':>10}{'command':>10}")
    for name, r in results.items():
        print(f"{name:<12}{r['job_list']['p50_ms']:>11.1f} ms{r['job_list']['p99_ms']:>7.1f} ms"
              f"{r['job_runs']['p50_ms']:>11.1f} ms{r['job_runs']['p99_ms']:>7.1f} ms"
              f"{r['command_job_list_seconds_p50']:>9.2f} s")
    if transferred:
        print(f"{'backup':<10}{'local':>9}{'server':>9}{'ratio':>7}{'server MiB/s':>14}")
        for label in ("files", "vm_image"):
            r = transferred[label]
            print(f"{label:<10}{r['local_seconds']:>7.1f} s{r['server_seconds']:>7.1f} s{r['ratio']:>7.2f}"
                  f"{r['server_mib_s']:>14.1f}")
        for count, r in transferred["agents"].items():
            print(f"{count:>3} agent(s) at once: {r['bytes'] >> 20} MiB in {r['seconds']:.1f} s, "
                  f"{r['total_mib_s']:.1f} MiB/s in total")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
