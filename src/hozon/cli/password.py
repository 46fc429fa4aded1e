"""Where a repository password comes from: a flag, the environment, the config file, or a prompt.

First found wins (restic's order: a file or command named on the command line beats the variable):
``--password-command`` / ``--password-file``; ``HOZON_PASSWORD``; ``HOZON_PASSWORD_FILE`` /
``HOZON_PASSWORD_COMMAND``; the config file's ``password_file`` / ``password_command``; a prompt on
a terminal. A command's standard output is the password (trailing newlines dropped), as is a file's.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import typer
from typer import _click as click  # typer carries its own copy of click
from typer._click.globals import get_current_context

from hozon.errors import UsageError
from hozon.repo.backends import Backend

_META = "hozon.password"  # ctx.meta key: {"file"|"command": (value, ParameterSource)}
# HOZON_PASSWORD ranks 1: below a flag, above the file and command variables and the config file.
_RANKS = {click.core.ParameterSource.COMMANDLINE: 0, click.core.ParameterSource.ENVIRONMENT: 2,
          click.core.ParameterSource.DEFAULT_MAP: 3}


def add_options(command: click.Command) -> None:
    """Give every command of the tree that opens a repository (has ``--repo``) the password options."""
    from hozon.cli.manual import walk  # the tree as manual walks it

    for _name, cmd in walk(command):
        if any(p.name == "repo" for p in cmd.params):
            cmd.params += typer.main.get_command(_carrier).params


def _remember(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> None:
    if value:
        kind = "file" if param.name == "password_file" else "command"
        ctx.meta.setdefault(_META, {})[kind] = (value, ctx.get_parameter_source(param.name or kind))


_carrier = typer.Typer(add_completion=False)  # builds the options as typer builds any (there is no other public way)


@_carrier.command()
def _password_options(
    password_file: str | None = typer.Option(
        None, "--password-file", metavar="FILE", envvar="HOZON_PASSWORD_FILE", expose_value=False,
        callback=_remember, help="Read the repository password from FILE."),
    password_command: str | None = typer.Option(
        None, "--password-command", metavar="COMMAND", envvar="HOZON_PASSWORD_COMMAND", expose_value=False,
        callback=_remember, help="Run COMMAND (split into words as a shell would, but run by none); its output "
                                 "is the repository password."),
) -> None:
    """Never run: its options are added to the commands that open a repository."""


def read_password(confirm: bool = False, prompt: str = "repository password: ", required: bool = True,
                  backend: Backend | None = None) -> str | None:
    """The password from the first source given (module docstring), an enrolled agent's for its server's
    repository (``backend``), or a prompt on a terminal.

    ``confirm``: a new password (asked twice on a terminal); an empty one is refused however it
    came. Not ``required``: None when no source is given, without prompting.
    """
    password = _given_password()
    if password is None and backend is not None:
        password = agent_password(backend)
    if password is None:
        if not required:
            return None
        if not sys.stdin.isatty():
            raise UsageError("no password given", hint="give --password-file or --password-command, or set "
                                                       "HOZON_PASSWORD, or run on a terminal")
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("enter it again: ") != password:
            raise UsageError("the two passwords differ")
    if confirm and not password:
        raise UsageError("an empty password is not allowed", hint="use --insecure-no-encryption for none")
    return password


def agent_password(backend: Backend) -> str | None:
    """An agent writing into its server's repository uses the password it got at enrolment."""
    from hozon.repo.backends.remote import RemoteBackend

    return backend.password if isinstance(backend, RemoteBackend) else None


def password_origin() -> str:
    """Where the password will come from, never the password itself (for ``hozon config show``)."""
    sources = _sources()
    return sources[0][1] if sources else "a prompt on the terminal (default)"


def _given_password() -> str | None:
    sources = _sources()
    return sources[0][2]() if sources else None


def _sources() -> list[tuple[int, str, Callable[[], str]]]:
    """The sources given, best first: (rank, where it is, how to read it). Two of one rank are refused."""
    ctx = get_current_context(silent=True)
    given: dict[str, tuple[str, Any]] = ctx.meta.get(_META, {}) if ctx is not None else {}
    sources: list[tuple[int, str, Callable[[], str]]] = []
    for kind, (value, source) in given.items():
        rank = _RANKS.get(source, 3)
        where = {0: "command line", 2: "environment"}.get(rank, "config file")
        fetch = partial(read_password_file if kind == "file" else run_password_command, value)
        sources.append((rank, f"password_{kind} = {value} ({where})", fetch))
    if "HOZON_PASSWORD" in os.environ:
        sources.append((1, "HOZON_PASSWORD (environment)", partial(os.environ.__getitem__, "HOZON_PASSWORD")))
    sources.sort(key=lambda source: source[0])
    if len(sources) > 1 and sources[0][0] == sources[1][0]:
        raise UsageError("a password file and a password command are both given; give one")
    return sources


def read_password_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read the password file {path}: {exc.strerror}") from exc
    return _text(raw, f"the password file {path}")


def run_password_command(command: str) -> str:
    """The standard output of ``command``; one sentence if it cannot run, fails or prints nothing."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"the password command {command!r} cannot be split into words: {exc}") from exc
    if not argv:
        raise UsageError("the password command is empty")
    try:  # its stderr and stdin stay ours: a command may ask (pass, a keyring) on the terminal
        done = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    except OSError as exc:
        raise UsageError(f"the password command {argv[0]} cannot be run: {exc.strerror}") from exc
    if done.returncode != 0:
        raise UsageError(f"the password command {argv[0]} failed (exit status {done.returncode})")
    password = _text(done.stdout, f"the output of the password command {argv[0]}")
    if not password:
        raise UsageError(f"the password command {argv[0]} printed no password")
    return password


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text (byte {exc.start})") from exc
    return text.rstrip("\n")
