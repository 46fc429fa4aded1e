"""The ``hozon`` command and the one place where errors become exit codes and messages."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.text import Text

from hozon import __version__
from hozon.allocator import tune_for_large_buffers
from hozon.cli import (
    agent_cmd,
    backup_cmd,
    check_cmd,
    checkpoint_cmd,
    config,
    config_cmd,
    copy_cmd,
    dump_cmd,
    find_cmd,
    forget_cmd,
    generate_cmd,
    job_cmd,
    manual,
    password,
    repair_cmd,
    repo_cmd,
    restore_cmd,
    server_cmd,
    snapshots_cmd,
    stats_cmd,
    tag_cmd,
    vm_cmd,
)
from hozon.cli.common import err_console
from hozon.errors import HozonError

WARNINGS_EXIT = 3

app = typer.Typer(
    name="hozon", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Deduplicated, compressed, encrypted backups of files and VMs.", context_settings=manual.CONTEXT_SETTINGS,
)
app.command()(repo_cmd.init)
app.command()(backup_cmd.backup)
app.command()(snapshots_cmd.snapshots)
app.command()(snapshots_cmd.ls)
app.command()(snapshots_cmd.diff)
app.command()(dump_cmd.dump)
app.command()(find_cmd.find)
app.command()(stats_cmd.stats)
app.command()(tag_cmd.tag)
app.command()(restore_cmd.restore)
app.command()(check_cmd.check)
app.command()(repo_cmd.cat)
app.command()(repo_cmd.unlock)
app.command()(forget_cmd.forget)
app.command()(forget_cmd.prune)
app.command()(copy_cmd.copy)
app.add_typer(repo_cmd.key_app, name="key")
app.add_typer(repo_cmd.list_app, name="list")
app.add_typer(repair_cmd.repair_app, name="repair")
app.add_typer(config_cmd.config_app, name="config")
vm_cmd.vm_app.add_typer(checkpoint_cmd.checkpoint_app, name="checkpoint")
vm_cmd.vm_app.command("memory")(checkpoint_cmd.vm_memory)
app.add_typer(vm_cmd.vm_app, name="vm")
app.add_typer(server_cmd.server_app, name="server")
app.add_typer(agent_cmd.agent_app, name="agent")
app.command()(agent_cmd.agents)
app.add_typer(job_cmd.job_app, name="job")
app.command()(generate_cmd.generate)


@app.command()
def version() -> None:
    """Print Hozon's version."""
    print(f"hozon {__version__}")


def _print_version(value: bool) -> None:
    if value:
        print(f"hozon {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print Hozon's version and exit."),
) -> None:
    """Deduplicated, compressed, encrypted backups of files and VMs."""


def _interrupted() -> NoReturn:
    err_console.print("hozon: interrupted; nothing was committed by the interrupted step")
    sys.exit(130)


def main() -> None:
    tune_for_large_buffers()
    try:
        # Without standalone mode click returns the code of a ``typer.Exit`` instead of exiting.
        manual.serve_completion_requests()
        root = typer.main.get_command(app)
        password.add_options(root)
        defaults = config.default_map(root, config.load())  # flags and the environment override these
        code = manual.finish(root).main(prog_name="hozon", standalone_mode=False, default_map=defaults)
        if isinstance(code, int) and code:
            sys.exit(code)
    except HozonError as exc:
        # Messages hold paths: never read as markup ('[' in a name), never wrapped (one line to grep).
        label = "warning" if exc.exit_code == WARNINGS_EXIT else "error"  # done, but with something left over
        err_console.print(Text.assemble((f"hozon: {label}:", "red"), " ", exc.message), soft_wrap=True)
        if exc.hint:
            err_console.print(f"hint: {exc.hint}", markup=False, soft_wrap=True)
        for note in getattr(exc, "__notes__", []):  # e.g. a guest left frozen while the backup failed
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # typer's way of reporting Ctrl-C
            _interrupted()
        sys.exit(exc.exit_code)
    except typer.Abort:  # click's way of reporting Ctrl-C
        _interrupted()
    except Exception as exc:  # command-line errors: click's, or those of the copy of click newer typers carry
        show = getattr(exc, "show", None)
        code = getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
