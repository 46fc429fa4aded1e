"""The ``hozon`` command and the one place where errors become exit codes and messages."""

from __future__ import annotations

import sys

import typer

from hozon import __version__
from hozon.cli import backup_cmd, repo_cmd, restore_cmd, snapshots_cmd
from hozon.cli.common import err_console
from hozon.errors import HozonError

app = typer.Typer(
    name="hozon", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Deduplicated, compressed, encrypted backups of files and VMs.",
)
app.command()(repo_cmd.init)
app.command()(backup_cmd.backup)
app.command()(snapshots_cmd.snapshots)
app.command()(snapshots_cmd.ls)
app.command()(snapshots_cmd.diff)
app.command()(restore_cmd.restore)
app.command()(repo_cmd.cat)
app.command()(repo_cmd.unlock)
app.add_typer(repo_cmd.key_app, name="key")
app.add_typer(repo_cmd.list_app, name="list")


@app.command()
def version() -> None:
    """Print Hozon's version."""
    print(f"hozon {__version__}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except HozonError as exc:
        err_console.print(f"[red]hozon: error:[/] {exc.message}", markup=True, highlight=False)
        if exc.hint:
            err_console.print(f"hint: {exc.hint}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("hozon: interrupted; nothing was committed by the interrupted step")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
