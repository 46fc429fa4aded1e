"""hozon server …: set up and run the backup server."""

from __future__ import annotations

from pathlib import Path

import typer

from hozon.cli.common import JsonOption, console, err_console, print_json
from hozon.server.paths import DEFAULT_LISTEN, ServerDir

server_app = typer.Typer(help="Set up and run the backup server.", no_args_is_help=True)

token_app = typer.Typer(help="One-time enrolment tokens for agents.", no_args_is_help=True)
server_app.add_typer(token_app, name="token")

DirOption = typer.Option(..., "--dir", metavar="DIR", help="The server's directory.")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@server_app.command("init")
def server_init(
    directory: Path = DirOption,
    listen: str = typer.Option(DEFAULT_LISTEN, "--listen", metavar="HOST:PORT",
                               help="Address and port to serve HTTPS on."),
    name: list[str] = typer.Option([], "--name", metavar="NAME",
                                   help="A DNS name or address clients use for this server (repeatable; goes into "
                                        "its certificate)."),
    catalog: str = typer.Option("", "--catalog", metavar="URL",
                                help="postgresql://… to keep the catalog in PostgreSQL (default: SQLite in DIR)."),
    json_out: bool = JsonOption,
) -> None:
    """Create a server directory: CA and TLS certificate, admin credential, catalog."""
    from hozon.server.setup import init_server

    result = init_server(directory, listen, name, catalog)
    if json_out:
        print_json({"dir": str(directory), "url": result.url, "fingerprint": result.fingerprint,
                    "admin_token_file": str(result.server_dir.admin_token)})
        return
    console.print(f"server directory {directory} is ready; start it with: hozon server run --dir {directory}",
                  markup=False)
    console.print(f"URL: {result.url}", markup=False)
    console.print(f"CA fingerprint (SHA-256): {result.fingerprint}", markup=False)
    console.print(f"admin credential: {result.server_dir.admin_token} (keep it private)", markup=False)


@server_app.command("run")
def server_run(directory: Path = DirOption) -> None:
    """Serve the API over HTTPS and run scheduled jobs until stopped (Ctrl-C, SIGTERM)."""
    from hozon.server import pki
    from hozon.server.run import serve
    from hozon.server.setup import server_url

    server_dir = ServerDir(directory)
    settings = server_dir.load_settings()
    err_console.print(f"hozon server on {server_url(settings)}; CA fingerprint (SHA-256) "
                      f"{pki.fingerprint(server_dir.ca_cert.read_bytes())}", markup=False, soft_wrap=True)
    serve(server_dir)


@token_app.command("create")
def token_create(
    directory: Path = DirOption,
    namespace: str = typer.Option(..., "--namespace", metavar="NS", help="The namespace the agent will write into "
                                  "(created on first use)."),
    expires: str = typer.Option("1h", "--expires", metavar="DURATION", help="How long it is valid: 90s, 30m, 1h, 7d."),
    json_out: bool = JsonOption,
) -> None:
    """Make a one-time enrolment token for an agent (asks the running server)."""
    from hozon.server.admin_client import AdminClient

    with AdminClient.connect(directory, None, None, None) as admin:
        doc = admin.call("POST", "/api/v1/tokens", json={"namespace": namespace, "expires_in": parse_duration(expires)})
    if json_out:
        print_json({k: doc[k] for k in ("token", "fingerprint", "url", "namespace", "expires")})
        return
    console.print(f"enrolment token for namespace {namespace} (one use, until {doc['expires'][:19]} UTC):",
                  markup=False)
    console.print(doc["token"], markup=False)
    console.print(f"on the agent: hozon agent enroll {doc['url']} --token TOKEN --dir AGENT_DIR", markup=False)


@server_app.command("repo")
def server_repo(
    directory: Path = DirOption,
    namespace: str = typer.Option(..., "--namespace", metavar="NS", help="The namespace."),
    env: bool = typer.Option(False, "--env", help="Print shell exports for the ordinary commands."),
) -> None:
    """Where a namespace's repository and password file are, to use it with the ordinary commands."""
    import shlex

    from hozon.errors import UsageError

    server_dir = ServerDir(directory)
    server_dir.load_settings()
    repo, password = server_dir.repository(namespace), server_dir.password_file(namespace)
    if not (repo / "config").exists():
        raise UsageError(f"namespace {namespace} has no repository yet",
                         hint="a namespace is created with its first enrolment token")
    if env:
        print(f"export HOZON_REPO={shlex.quote(str(repo))} HOZON_PASSWORD_FILE={shlex.quote(str(password))}")
        return
    console.print(f"repository: {repo}\npassword file: {password}", markup=False)


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d`` (a bare number is seconds) in seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1
    if value <= 0:
        from hozon.errors import UsageError

        raise UsageError(f"{text!r} is not a duration", hint="write it as 90s, 30m, 1h or 7d")
    return value
