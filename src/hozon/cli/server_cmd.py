"""hozon server …: set up and run the backup server."""

from __future__ import annotations

from pathlib import Path

import typer

from hozon.cli.common import JsonOption, console, err_console, print_json
from hozon.server.paths import DEFAULT_LISTEN, ServerDir

server_app = typer.Typer(help="Set up and run the backup server.", no_args_is_help=True)

DirOption = typer.Option(..., "--dir", metavar="DIR", help="The server's directory.")


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
