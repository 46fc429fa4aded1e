"""Every option of every command says what it does (help text), checked on the command tree itself."""

from __future__ import annotations

import typer
from typer.core import TyperOption

from hozon.cli import manual
from hozon.cli.app import app


def test_every_option_has_help_and_every_command_a_description() -> None:
    root = manual.finish(typer.main.get_command(app))
    missing = []
    for name, command in manual.walk(root):
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if isinstance(param, TyperOption) and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
    assert missing == []
