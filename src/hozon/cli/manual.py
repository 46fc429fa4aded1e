"""The command tree as people read it: help text, the reference in docs/cli.md, man pages, completion.

Everything here is derived from the commands themselves (their options, metavars and docstrings),
so ``--help``, the man pages and docs/cli.md cannot disagree; a test regenerates docs/cli.md and
compares. Help is click's plain layout (as restic's and borg's), not rich's boxes: it is read in
terminals, pasted in tickets and grepped.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator

from typer import _click as click  # typer carries its own copy of click (there is no click package)
from typer._completion_classes import completion_init
from typer._completion_shared import get_completion_script
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from hozon import __version__

PROG = "hozon"
COMPLETE_VAR = "_HOZON_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
HELP_WIDTH = 100
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": HELP_WIDTH}


def finish(command: click.Command) -> click.Command:
    """Make every command of the tree show names, not Python types: ``--tag TAG``, ``SNAPSHOT``.

    Options without a metavar get their name in capitals; arguments show their metavar in the usage
    line and nothing in the type column (typer would print ``<list[str]>``). Plain help layout.
    """
    for _name, cmd in walk(command):
        if isinstance(cmd, TyperGroup | TyperCommand):
            cmd.rich_markup_mode = None  # click's plain layout
        for param in cmd.params:
            if isinstance(param, TyperArgument):
                if param.metavar is None:
                    param.metavar = (param.name or "arg").upper()
                usage = param.metavar + ("..." if param.nargs != 1 else "")
                usage = usage if param.required else f"[{usage}]"
                param.display_type_rich = _no_type  # type: ignore[method-assign]
                param._usage_display_name = _fixed(usage)  # type: ignore[method-assign]
            elif isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                param.metavar = (param.name or "value").upper()
    return command


def _no_type(ctx: click.Context) -> None:
    return None


def _fixed(text: str) -> Callable[[], str]:
    return lambda: text


def walk(command: click.Command, name: str = PROG) -> Iterator[tuple[str, click.Command]]:
    """Every command of the tree with its full name (``hozon vm backup``), parents first."""
    yield name, command
    if isinstance(command, TyperGroup):
        for sub_name in command.list_commands(click.Context(command)):
            sub = command.get_command(click.Context(command), sub_name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, f"{name} {sub_name}")


def help_text(command: click.Command, name: str) -> str:
    """What ``NAME --help`` prints, at a fixed width."""
    parent: click.Context | None = None
    for part in name.split()[:-1]:
        parent = click.Context(command, info_name=part, parent=parent)
    ctx = click.Context(command, info_name=name.split()[-1], parent=parent, max_content_width=HELP_WIDTH,
                        terminal_width=HELP_WIDTH)
    return command.get_help(ctx)


def reference_markdown(root: click.Command) -> str:
    """docs/cli.md: each command's --help, in command order."""
    out = ["# Command reference", "",
           "Generated from the commands' own `--help` by `hozon generate --markdown docs/cli.md`; a test keeps it "
           "in step. Exit codes: docs/exit-codes.md; pattern syntax: docs/patterns.md.", ""]
    for name, _cmd in walk(root):
        full = _full_command(root, name)
        out += [f"## {name}", "", "```text", help_text(full, name).rstrip(), "```", ""]
    return "\n".join(out)


def _full_command(root: click.Command, name: str) -> click.Command:
    command = root
    for part in name.split()[1:]:
        assert isinstance(command, TyperGroup)
        found = command.get_command(click.Context(command), part)
        assert found is not None
        command = found
    return command


def man_pages(root: click.Command) -> dict[str, str]:
    """One roff page per command: ``hozon.1``, ``hozon-backup.1``, ``hozon-vm-backup.1`` …"""
    date = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or
                                           datetime.datetime.now().timestamp(), datetime.UTC).strftime("%Y-%m-%d")
    pages: dict[str, str] = {}
    names = [name for name, _ in walk(root)]
    for name, cmd in walk(root):
        page = name.replace(" ", "-")
        ctx = click.Context(cmd, info_name=name)
        lines = [f'.TH "{page.upper()}" 1 "{date}" "hozon {__version__}" "Hozon Manual"',
                 ".SH NAME", f"{_roff(page)} \\- {_roff(cmd.get_short_help_str(200))}",
                 ".SH SYNOPSIS", f".B {_roff(name)}", _roff(" ".join(cmd.collect_usage_pieces(ctx))),
                 ".SH DESCRIPTION", _roff(cmd.help or "")]
        options = [p for p in cmd.get_params(ctx) if isinstance(p, TyperOption)]
        arguments = [p for p in cmd.params if isinstance(p, TyperArgument)]
        if arguments:
            lines.append(".SH ARGUMENTS")
            for arg in arguments:
                name_text = _roff(arg.metavar or arg.name or "")
                lines += [".TP", f"\\fB{name_text}\\fR", _roff(getattr(arg, "help", None) or "")]
        if options:
            lines.append(".SH OPTIONS")
            for opt in options:
                record = opt.get_help_record(ctx)
                if record is not None:
                    lines += [".TP", f"\\fB{_roff(record[0])}\\fR", _roff(record[1])]
        if isinstance(cmd, TyperGroup):
            lines.append(".SH COMMANDS")
            for sub in cmd.list_commands(ctx):
                lines += [".TP", f"\\fB{_roff(page)}-{_roff(sub)}\\fR(1)"]
        others = [n.replace(" ", "-") for n in names if n != name and (n.startswith(name + " ") or n == PROG)]
        lines += [".SH SEE ALSO", ", ".join(f"\\fB{_roff(o)}\\fR(1)" for o in others[:40]) or "\\fBhozon\\fR(1)"]
        pages[f"{page}.1"] = "\n".join(lines) + "\n"
    return pages


def _roff(text: str) -> str:
    """Plain text for a roff line: backslashes doubled, a leading dot or quote guarded."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def completion_script(shell: str) -> str:
    """The script a shell sources so that ``hozon <TAB>`` completes commands and options."""
    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)


def serve_completion_requests() -> None:
    """A shell's completion request runs ``hozon`` with COMPLETE_VAR set: make click answer it."""
    if COMPLETE_VAR in os.environ:
        completion_init()
