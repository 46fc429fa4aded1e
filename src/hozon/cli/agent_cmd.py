"""hozon agent …: enrol this machine with a backup server; hozon agents / agent revoke: manage agents."""

from __future__ import annotations

from pathlib import Path

import typer

from hozon.cli.common import JsonOption, console, print_json

agent_app = typer.Typer(help="Enrol this machine as an agent of a backup server, and revoke agents.",
                        no_args_is_help=True)

ServerDirOption = typer.Option(..., "--dir", metavar="DIR", help="The server's directory (on the server host).")


@agent_app.command("enroll")
def agent_enroll(
    url: str = typer.Argument(..., metavar="URL", help="The server's https:// URL."),
    token: str = typer.Option(..., "--token", envvar="HOZON_ENROL_TOKEN", metavar="TOKEN",
                              help="The one-time token from hozon server token create. Env: HOZON_ENROL_TOKEN."),
    directory: Path = typer.Option(..., "--dir", metavar="AGENT_DIR", help="Where to keep the agent's credential."),
    name: str | None = typer.Option(None, "--name", metavar="NAME",
                                    help="The agent's name (default: this host's name)."),
    fingerprint: str | None = typer.Option(None, "--fingerprint", metavar="SHA256",
                                           help="The server's CA fingerprint (default: the one the token carries)."),
    json_out: bool = JsonOption,
) -> None:
    """Check the server's CA fingerprint, spend the token, and keep this agent's credential in AGENT_DIR."""
    from hozon.agent.enroll import enroll

    config = enroll(url, token, directory, name, fingerprint)
    if json_out:
        print_json({"agent_id": config.agent_id, "name": config.name, "namespace": config.namespace,
                    "url": config.url, "dir": str(directory)})
        return
    console.print(f"enrolled as agent {config.name} in namespace {config.namespace}; "
                  f"credential in {directory / 'agent.json'} (keep it private)", markup=False)
    console.print(f"its repository: HOZON_AGENT_DIR={directory} HOZON_REPO=hozon+https://"
                  f"{config.url.removeprefix('https://')}/{config.namespace}", markup=False)


@agent_app.command("run")
def agent_run(
    directory: Path = typer.Option(..., "--dir", metavar="AGENT_DIR", envvar="HOZON_AGENT_DIR",
                                   help="The enrolled agent's directory. Env: HOZON_AGENT_DIR."),
    parallel: int = typer.Option(1, "--parallel", metavar="N", min=1, max=64,
                                 help="Carry out up to N runs at once (never two of one VM)."),
) -> None:
    """Take runs from the server and carry them out, until stopped (SIGTERM, SIGINT).

    Holds no port: it polls the server over HTTPS and retries with back-off while the server is
    away. A run in progress when the agent is stopped is cancelled and reported failed.
    """
    import logging

    from hozon.agent.config import AgentConfig
    from hozon.agent.daemon import Daemon

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s hozon-agent: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    logger = logging.getLogger("hozon.agent")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    daemon = Daemon(AgentConfig.load(directory), parallel)
    with daemon.signals():
        daemon.run()


@agent_app.command("revoke")
def agent_revoke(name: str = typer.Argument(..., metavar="NAME", help="The agent's name."),
                 directory: Path = ServerDirOption) -> None:
    """Refuse the agent's credential from now on (its snapshots stay)."""
    from urllib.parse import quote

    from hozon.server.admin_client import AdminClient

    with AdminClient.connect(directory, None, None, None) as admin:
        admin.call("POST", f"/api/v1/agents/{quote(name, safe='')}/revoke")
    console.print(f"agent {name} is revoked", markup=False)


def agents(directory: Path = ServerDirOption, json_out: bool = JsonOption) -> None:
    """List the enrolled agents: name, namespace, when enrolled and last seen, revoked."""
    from rich.table import Table

    from hozon.server.admin_client import AdminClient

    with AdminClient.connect(directory, None, None, None) as admin:
        rows = admin.call("GET", "/api/v1/agents")
    if json_out:
        print_json(rows)
        return
    table = Table("name", "namespace", "host", "enrolled", "last seen", "revoked", box=None)
    for row in rows:
        table.add_row(row["name"], row["namespace"], row["hostname"], row["enrolled"][:19],
                      (row["last_seen"] or "never")[:19], "yes" if row["revoked"] else "")
    console.print(table)
