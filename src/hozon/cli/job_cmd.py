"""hozon job …: define backup, verify and prune jobs on the server, run them, read their runs.

Every command speaks the server's HTTPS API with the admin credential (``--dir DIR`` on the server
host; ``--server URL`` + ``HOZON_SERVER_TOKEN`` + ``--ca FILE`` elsewhere).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from hozon.cli.common import JsonOption, console, err_console, human_bytes, print_json
from hozon.errors import HozonError, ServerError, UsageError

if TYPE_CHECKING:
    from hozon.server.admin_client import AdminClient

job_app = typer.Typer(help="Define backup jobs on the server, run them, and read their runs.", no_args_is_help=True)

WARNING_EXIT = 3
FINAL = ("succeeded", "warning", "failed")

DirOption = typer.Option(None, "--dir", metavar="DIR", envvar="HOZON_SERVER_DIR",
                         help="The server's directory (on the server host). Env: HOZON_SERVER_DIR.")
ServerOption = typer.Option(None, "--server", metavar="URL", envvar="HOZON_SERVER_URL",
                            help="The server's URL, with the admin credential in HOZON_SERVER_TOKEN. "
                                 "Env: HOZON_SERVER_URL.")
CaOption = typer.Option(None, "--ca", metavar="FILE", envvar="HOZON_SERVER_CA",
                        help="The server's CA certificate (a copy of DIR/tls/ca.pem), for --server. "
                             "Env: HOZON_SERVER_CA.")
FingerprintOption = typer.Option(None, "--fingerprint", metavar="SHA256", envvar="HOZON_SERVER_FINGERPRINT",
                                 help="Check that --ca is the CA with this fingerprint. "
                                      "Env: HOZON_SERVER_FINGERPRINT.")


def _client(directory: Path | None, server: str | None, ca: Path | None, fingerprint: str | None) -> AdminClient:
    from hozon.server.admin_client import AdminClient  # httpx and the server's modules: only when used

    return AdminClient.connect(directory, server, ca, fingerprint)


@job_app.command("add")
def job_add(
    name: str = typer.Argument(..., metavar="NAME", help="The job's name (letters, digits, '.', '_', '-')."),
    agent: str = typer.Option(None, "--agent", metavar="AGENT", help="The agent that runs a backup job."),
    paths: list[str] = typer.Option([], "--paths", metavar="PATH",
                                    help="Back up these files and directories on the agent's host (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", metavar="PATTERN",
                                      help="Leave out what matches (repeatable; with --paths; docs/patterns.md)."),
    vm: str = typer.Option(None, "--vm", metavar="VM", help="Back up the disks of this VM (with --qmp or --libvirt)."),
    checkpoint: str = typer.Option(None, "--checkpoint", metavar="VM",
                                   help="Take a checkpoint (disks and memory) of this VM (with --qmp or --libvirt)."),
    qmp: str = typer.Option(None, "--qmp", metavar="SOCKET", help="The VM's QMP socket on the agent's host."),
    libvirt: str = typer.Option(None, "--libvirt", metavar="DOMAIN", help="The VM's libvirt domain."),
    connect: str = typer.Option(None, "--connect", metavar="URI", help="libvirt URI for --libvirt."),
    mode: str = typer.Option(None, "--mode", metavar="MODE", help="For --vm: auto, full or incremental."),
    verify: str = typer.Option(None, "--verify", metavar="NS",
                               help="Verify namespace NS's repository on the server (check --read-data)."),
    subset: str = typer.Option(None, "--subset", metavar="N/M|N%",
                               help="With --verify: read only this part of the data (1/7 each night of a week)."),
    prune: str = typer.Option(None, "--prune", metavar="NS", help="Prune namespace NS's repository on the server."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="Tag the job's snapshots (repeatable)."),
    schedule: str = typer.Option(None, "--schedule", metavar="CRON",
                                 help="When to run, as cron fields in the server's local time ('30 2 * * *')."),
    keep_last: int = typer.Option(0, "--keep-last", metavar="N", help="Keep the N newest snapshots of the job."),
    keep_hourly: int = typer.Option(0, "--keep-hourly", metavar="N", help="Keep the newest of each of N hours."),
    keep_daily: int = typer.Option(0, "--keep-daily", metavar="N", help="Keep the newest of each of N days."),
    keep_weekly: int = typer.Option(0, "--keep-weekly", metavar="N", help="Keep the newest of each of N weeks."),
    keep_monthly: int = typer.Option(0, "--keep-monthly", metavar="N", help="Keep the newest of each of N months."),
    keep_yearly: int = typer.Option(0, "--keep-yearly", metavar="N", help="Keep the newest of each of N years."),
    keep_within: str = typer.Option(None, "--keep-within", metavar="DURATION",
                                    help="Keep every snapshot this close to the job's newest (1y6m, 14d)."),
    disabled: bool = typer.Option(False, "--disabled",
                                  help="Define the job without scheduling it (job run still runs it)."),
    directory: Path = DirOption, server: str = ServerOption, ca: Path = CaOption, fingerprint: str = FingerprintOption,
    json_out: bool = JsonOption,
) -> None:
    """Define a job: a backup an agent runs (--paths, --vm, --checkpoint) or a server job (--verify, --prune)."""
    kinds = {"files": bool(paths), "vm": bool(vm), "checkpoint": bool(checkpoint), "verify": bool(verify),
             "prune": bool(prune)}
    chosen = [k for k, given in kinds.items() if given]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --paths, --vm, --checkpoint, --verify and --prune")
    kind = chosen[0]
    specs: dict[str, dict[str, Any]] = {"files": {"paths": paths, "exclude": exclude},
                                        "vm": {"vm": vm, "mode": mode}, "checkpoint": {"vm": checkpoint},
                                        "verify": {"subset": subset}, "prune": {}}
    spec = specs[kind]
    if kind in ("vm", "checkpoint"):
        spec.update(qmp=qmp, libvirt=libvirt, connect=connect)
    if kind in ("files", "vm", "checkpoint"):
        spec["tags"] = tag
    spec = {k: v for k, v in spec.items() if v}
    backups = ("files", "vm", "checkpoint")
    fits = {"--exclude": (exclude, ("files",)), "--qmp/--libvirt/--connect": (qmp or libvirt or connect,
            ("vm", "checkpoint")), "--mode": (mode, ("vm",)), "--subset": (subset, ("verify",)),
            "--tag": (tag, backups)}
    for option, (given, kinds_for) in fits.items():
        if given and kind not in kinds_for:
            raise UsageError(f"{option} does not go with a {kind} job")
    retention: dict[str, Any] = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily,
                                 "weekly": keep_weekly, "monthly": keep_monthly, "yearly": keep_yearly,
                                 "within": keep_within}
    body = {"name": name, "kind": kind, "agent": agent, "namespace": verify or prune, "spec": spec,
            "schedule": schedule, "retention": {k: v for k, v in retention.items() if v}, "enabled": not disabled}
    with _client(directory, server, ca, fingerprint) as api:
        job = api.call("POST", "/api/v1/jobs", json=body)
    if json_out:
        print_json(job)
        return
    where = f"on agent {job['agent']}" if job["agent"] else "on the server"
    when = f"; next run {job['next_run']}" if job["next_run"] else "; no schedule: run it with hozon job run"
    console.print(f"job {job['name']} ({job['kind']} of {job['subject']}, namespace {job['namespace']}) "
                  f"runs {where}{when}", markup=False)


@job_app.command("list")
def job_list(directory: Path = DirOption, server: str = ServerOption, ca: Path = CaOption,
             fingerprint: str = FingerprintOption, json_out: bool = JsonOption) -> None:
    """List the jobs with their schedule and last run."""
    with _client(directory, server, ca, fingerprint) as api:
        jobs = api.call("GET", "/api/v1/jobs")
    if json_out:
        print_json(jobs)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("Job", "Kind", "Runs on", "What", "Schedule", "Next run", "Last run"):
        table.add_column(col)
    for job in jobs:
        last = job["last_run"]
        last_text = f"{last['state']} ({last['finished'] or last['queued_at']})" if last else "never"
        cells = (job["name"], job["kind"], job["agent"] or "server", job["subject"], job["schedule"] or "-",
                 job["next_run"] or "-", last_text)
        table.add_row(*(escape(str(c)) for c in cells))
    console.print(table)


@job_app.command("run")
def job_run(
    name: str = typer.Argument(..., metavar="NAME", help="The job to run now."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the run to end: exit 0 if it succeeded, 3 on a "
                                                    "warning, 1 if it failed."),
    timeout: float = typer.Option(0, "--timeout", metavar="SECONDS", help="With --wait: give up after this long "
                                                                          "(0: never)."),
    directory: Path = DirOption, server: str = ServerOption, ca: Path = CaOption, fingerprint: str = FingerprintOption,
    json_out: bool = JsonOption,
) -> None:
    """Queue a run of a job now (if one is already waiting, that is the run)."""
    with _client(directory, server, ca, fingerprint) as api:
        run = api.call("POST", f"/api/v1/jobs/{name}/runs")
        if not json_out:
            verb = "queued" if run["new"] else "already queued"
            err_console.print(f"run {run['id']} of job {name} {verb}", markup=False)
        if wait:
            run = _wait(api, run["id"], timeout)
    if json_out:
        print_json(run)
    if not wait:
        return
    if run["state"] == "failed":
        raise HozonError(f"run {run['id']} of job {name} failed: {run['reason']}",
                         hint=f"its log: hozon job log {run['id']}")
    if not json_out:
        _print_outcome(run)
    if run["state"] == "warning":
        raise typer.Exit(WARNING_EXIT)


def _wait(api: AdminClient, run_id: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    delay = 0.2
    while True:
        run: dict[str, Any] = api.call("GET", f"/api/v1/runs/{run_id}")
        if run["state"] in FINAL:
            return run
        if deadline is not None and time.monotonic() > deadline:
            raise ServerError(f"run {run_id} is still {run['state']} after {timeout:g} s",
                              hint=f"follow it with: hozon job runs; its log: hozon job log {run_id}")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _print_outcome(run: dict[str, Any]) -> None:
    snapshot = f", snapshot {run['snapshot_id'][:8]}" if run["snapshot_id"] else ""
    took = f" in {run['duration']:.1f} s" if run["duration"] is not None else ""
    reason = f": {run['reason']}" if run["reason"] else ""
    console.print(f"run {run['id']} {run['state']}{took}; read {human_bytes(run['bytes_read'])}, stored "
                  f"{human_bytes(run['bytes_stored'])}{snapshot}{reason}", markup=False)


@job_app.command("runs")
def job_runs(
    name: str = typer.Argument(None, metavar="[NAME]", help="Only the runs of this job."),
    limit: int = typer.Option(50, "--limit", metavar="N", min=1, max=10_000, help="Show the N newest runs."),
    directory: Path = DirOption, server: str = ServerOption, ca: Path = CaOption, fingerprint: str = FingerprintOption,
    json_out: bool = JsonOption,
) -> None:
    """List runs, newest first: state, times, bytes, snapshot and reason."""
    params: dict[str, Any] = {"limit": limit, **({"job": name} if name else {})}
    with _client(directory, server, ca, fingerprint) as api:
        runs = api.call("GET", "/api/v1/runs", params=params)
    if json_out:
        print_json(runs)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("Run", "Job", "State", "Queued", "Took", "Read", "Stored", "Snapshot", "Reason"):
        table.add_column(col)
    for r in runs:
        took = f"{r['duration']:.1f} s" if r["duration"] is not None else "-"
        cells = (r["id"], r["job"], r["state"], r["queued_at"], took, human_bytes(r["bytes_read"]),
                 human_bytes(r["bytes_stored"]), (r["snapshot_id"] or "-")[:8], r["reason"])
        table.add_row(*(escape(str(c)) for c in cells))
    console.print(table)


@job_app.command("log")
def job_log(
    run_id: int = typer.Argument(..., metavar="RUN", help="The run's number (hozon job runs)."),
    directory: Path = DirOption, server: str = ServerOption, ca: Path = CaOption, fingerprint: str = FingerprintOption,
    json_out: bool = JsonOption,
) -> None:
    """Print a run's log: what happened, when, and why it ended as it did."""
    with _client(directory, server, ca, fingerprint) as api:
        lines = api.call("GET", f"/api/v1/runs/{run_id}/log")
    if json_out:
        print_json(lines)
        return
    for entry in lines:
        console.print(f"{entry['at']}  {entry['line']}", markup=False)
